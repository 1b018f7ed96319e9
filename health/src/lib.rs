//! gsb-health (skeleton)
#![forbid(unsafe_code)]
