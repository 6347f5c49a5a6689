//! The demo's run file and prior, compiled into the `lisa` binary: an installed `lisa`
//! (`cargo install --path cli`) runs `lisa demo` and `lisa study` from any directory, with no
//! source tree beside it. The prior (2.8 MB) is written next to the outputs that use it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lisa_trainer::weights::write_atomic;

/// `assets/demo.toml`.
pub const DEMO_RUN_FILE: &str = include_str!("../../assets/demo.toml");
/// Where errors about the shipped run file point.
pub const DEMO_RUN_FILE_ORIGIN: &str = "the shipped demo run file (assets/demo.toml)";
/// `assets/prior.safetensors`.
const PRIOR: &[u8] = include_bytes!("../../assets/prior.safetensors");
/// The name the shipped prior is written under.
pub const PRIOR_FILE: &str = "prior.safetensors";

/// What names the shipped prior in a study's settings: its digest (not a path, which changes
/// with the folder it was written to).
pub fn prior_label() -> String {
    format!("the shipped prior, sha256 {}", lisa_trainer::weights::digest(PRIOR))
}

/// The shipped prior as `dir/prior.safetensors` (written atomically unless it is already
/// there with the same bytes).
pub fn prior_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(PRIOR_FILE);
    if std::fs::read(&path).ok().as_deref() != Some(PRIOR) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&path, PRIOR).with_context(|| format!("cannot write the shipped prior to {}", path.display()))?;
    }
    Ok(path)
}
