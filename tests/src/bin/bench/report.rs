//! Collects figures and prints one table: gsb's figure, each peer's, and the ratio gsb / peer.

use std::collections::BTreeMap;

/// One measured figure for several contenders.
struct Row {
    group: String,
    metric: String,
    unit: String,
    /// Whether a smaller figure is better (latency, CPU, memory, failures).
    lower_better: bool,
    /// Insertion order of contenders, then value.
    values: Vec<(String, f64)>,
}

/// All figures of a run, in the order measured.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    setups: BTreeMap<String, String>,
    notes: Vec<String>,
}

impl Report {
    /// Records `value` of `contender` for `group`/`metric`.
    pub fn put(
        &mut self,
        group: &str,
        metric: &str,
        unit: &str,
        lower_better: bool,
        contender: &str,
        value: f64,
    ) {
        eprintln!("  {group}: {metric} [{contender}] = {value:.3} {unit}");
        if let Some(r) = self
            .rows
            .iter_mut()
            .find(|r| r.group == group && r.metric == metric)
        {
            r.values.push((contender.to_owned(), value));
            return;
        }
        self.rows.push(Row {
            group: group.to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            lower_better,
            values: vec![(contender.to_owned(), value)],
        });
    }

    /// States a benchmark's setup (printed above the table).
    pub fn setup(&mut self, group: &str, text: &str) {
        self.setups.insert(group.to_owned(), text.to_owned());
    }

    /// Something skipped or failed, printed under the table.
    pub fn note(&mut self, text: &str) {
        eprintln!("  note: {text}");
        self.notes.push(text.to_owned());
    }

    /// Rows, setups and notes as tab-separated lines, for a child run (`--rows`) to hand back.
    pub fn rows_text(&self) -> String {
        let mut s = String::new();
        for (g, t) in &self.setups {
            s.push_str(&format!("SETUP\t{g}\t{t}\n"));
        }
        for r in &self.rows {
            for (c, v) in &r.values {
                s.push_str(&format!(
                    "ROW\t{}\t{}\t{}\t{}\t{c}\t{v}\n",
                    r.group, r.metric, r.unit, r.lower_better
                ));
            }
        }
        for n in &self.notes {
            s.push_str(&format!("NOTE\t{}\n", n.replace('\n', " ")));
        }
        s
    }

    /// Takes in what a child run printed with [`Report::rows_text`].
    pub fn absorb(&mut self, text: &str) {
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                ["SETUP", g, t] => self.setup(g, t),
                ["ROW", g, m, u, lb, c, v] => {
                    if let Ok(v) = v.parse() {
                        self.put(g, m, u, *lb == "true", c, v);
                    }
                }
                ["NOTE", n]
                    if !["machine:", "gsb binary:", "load average"]
                        .iter()
                        .any(|p| n.starts_with(p)) =>
                {
                    self.note(n)
                }
                _ => {}
            }
        }
    }

    /// The whole report as Markdown.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (g, t) in &self.setups {
            s.push_str(&format!("- **{g}**: {t}\n"));
        }
        s.push_str("\n| bench | metric | unit | gsb | peer | peer value | gsb / peer |\n");
        s.push_str("|---|---|---|---:|---|---:|---:|\n");
        for r in &self.rows {
            let gsb = r.values.iter().find(|(c, _)| c == "gsb").map(|(_, v)| *v);
            let gsb_s = gsb.map(fmt).unwrap_or_else(|| "-".into());
            let peers: Vec<&(String, f64)> = r.values.iter().filter(|(c, _)| c != "gsb").collect();
            if peers.is_empty() {
                s.push_str(&format!(
                    "| {} | {} | {} | {gsb_s} | | | |\n",
                    r.group, r.metric, r.unit
                ));
            }
            for (peer, v) in peers {
                let ratio = match gsb {
                    Some(g) if *v != 0.0 => {
                        let x = g / v;
                        let better = if r.lower_better { x <= 1.0 } else { x >= 1.0 };
                        format!("{x:.2}{}", if better { "" } else { " (worse)" })
                    }
                    _ => "-".into(),
                };
                s.push_str(&format!(
                    "| {} | {} | {} | {gsb_s} | {peer} | {} | {ratio} |\n",
                    r.group,
                    r.metric,
                    r.unit,
                    fmt(*v)
                ));
            }
        }
        if !self.notes.is_empty() {
            s.push_str("\nNotes:\n");
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        s
    }
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}
