//! `gsb replicator`, `gsb verify`, `gsb copy-config`, `gsb resync` and the replicator half of `gsb check-config`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

fn load(config_path: &Path) -> anyhow::Result<gsb_replicator::Config> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config = gsb_replicator::Config::from_toml_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    if let Some(dir) = config_path.parent() {
        config.resolve_paths(dir);
    }
    Ok(config)
}

/// Runs the replicator until `shutdown`.
pub async fn replicator(
    config_path: &Path,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(config_path)?;
    gsb_replicator::run(config, registry, shutdown).await?;
    Ok(())
}

/// Compares both sites; exit 0 only if equal.
pub async fn verify(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let report = gsb_replicator::verify(&config).await?;
    println!("{report}");
    Ok(if report.is_equal() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Copies the config tables now.
pub async fn copy_config(config_path: &Path) -> anyhow::Result<()> {
    let config = load(config_path)?;
    let report = gsb_replicator::copy_config(&config).await?;
    print!("{report}");
    Ok(())
}

/// Resets the logical capture of both directions; the replicator rebuilds them.
pub async fn resync(config_path: &Path) -> anyhow::Result<()> {
    let config = load(config_path)?;
    let report = gsb_replicator::resync(&config).await?;
    print!("{report}");
    println!(
        "the replicator (running, or at its next start) now creates new slots and merges the rows; then run `gsb verify --config {}`",
        config_path.display()
    );
    Ok(())
}

/// Validates the `[replicator]` section.
pub fn check(config_text: &str) -> Result<(), String> {
    gsb_replicator::Config::from_toml_str(config_text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Connects to both sites' databases and checks the capture's prerequisites there: one line
/// per site; exit 1 when one is unreachable or lacks something (the line names the fix).
pub async fn check_databases(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let mut ok = true;
    for (site, r) in gsb_replicator::check_databases(&config).await {
        match r {
            Ok(()) => println!(
                "{} database: ok ({} capture)",
                site.as_str(),
                match config.capture {
                    gsb_replicator::Capture::Logical => "logical",
                    gsb_replicator::Capture::Triggers => "triggers",
                }
            ),
            Err(e) => {
                ok = false;
                println!("{} database: {e}", site.as_str());
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
