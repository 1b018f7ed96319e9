//! CPU time and memory of a process and its descendants, read from `/proc` (Linux only).

use std::collections::BTreeSet;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on every Linux we target).
const TICKS_PER_SEC: f64 = 100.0;

/// `(ppid, utime + stime in ticks)` from `/proc/<pid>/stat`, or None if the process is gone.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `root` and every live descendant (nginx and PostgreSQL fork workers).
pub fn tree(root: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat(pid) {
                    all.push((pid, ppid));
                }
            }
        }
    }
    let mut set = BTreeSet::from([root]);
    loop {
        let before = set.len();
        for &(pid, ppid) in &all {
            if set.contains(&ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.into_iter().collect()
}

/// CPU seconds (user + system) used so far by `root` and its descendants.
pub fn cpu_seconds(root: u32) -> f64 {
    tree(root)
        .into_iter()
        .filter_map(stat)
        .map(|(_, t)| t as f64 / TICKS_PER_SEC)
        .sum()
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`) in bytes.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory now, summed over the process tree, in bytes.
pub fn rss(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|p| status_kb(p, "VmRSS:"))
        .sum()
}

/// Peak resident memory (VmHWM), summed over the process tree, in bytes.
pub fn peak_rss(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|p| status_kb(p, "VmHWM:"))
        .sum()
}
