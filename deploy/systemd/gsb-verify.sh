#!/bin/sh
# Runs `gsb verify` and publishes its result for Prometheus through the node exporter's textfile
# collector (the GsbVerifyMismatch and GsbVerifyNotRun alerts read these two gauges).
# Install: install -m 0755 gsb-verify.sh /usr/local/libexec/gsb/gsb-verify.sh
set -u
config="${GSB_CONFIG:-/etc/gsb/gsb.toml}"
dir="${GSB_TEXTFILE_DIR:-/var/lib/prometheus/node-exporter}"
started=$(date +%s)
"${GSB_BIN:-/usr/local/bin/gsb}" --log-format json verify --config "$config"
code=$?
# Write then rename, so the node exporter never reads a half-written file.
tmp="$dir/gsb_verify.prom.$$"
cat > "$tmp" <<METRICS
# HELP gsb_verify_exit_code Exit code of the last gsb verify run (0: both sites equal).
# TYPE gsb_verify_exit_code gauge
gsb_verify_exit_code $code
# HELP gsb_verify_last_run_timestamp_seconds Unix time the last gsb verify run started.
# TYPE gsb_verify_last_run_timestamp_seconds gauge
gsb_verify_last_run_timestamp_seconds $started
METRICS
mv "$tmp" "$dir/gsb_verify.prom"
exit "$code"
