//! The study file, the plan of runs (arms × seeds, each run file resolved), and the merge of
//! an arm's keys over the base run file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::config::RunFile;

/// The study file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StudyFile {
    /// The run file every arm starts from (relative paths: from the study file's folder;
    /// default: the demo's run file).
    pub(super) base: Option<PathBuf>,
    /// The pretrained prior (default: the shipped one).
    pub(super) main: Option<PathBuf>,
    /// The seeds; every arm runs each.
    pub(super) seeds: Vec<u64>,
    /// Validate every N steps (and at step 0 and at the end).
    #[serde(default = "default_validation_steps")]
    pub(super) validation_steps: u64,
    /// IoU thresholds whose first crossing is reported, in steps and seconds.
    #[serde(default = "default_thresholds")]
    pub(super) thresholds: Vec<f32>,
    /// The arm the others are compared with (default: `baseline` when there is one).
    pub(super) reference: Option<String>,
    /// Checkpoint every N steps, for resuming (default: the validation interval).
    pub(super) checkpointing_steps: Option<u64>,
    /// The arms.
    #[serde(rename = "arm")]
    pub(super) arms: Vec<ArmSpec>,
}

fn default_validation_steps() -> u64 {
    60
}

fn default_thresholds() -> Vec<f32> {
    vec![0.5, 0.6, 0.7]
}

/// One arm: a name, the run-file keys it sets over the base, and optionally its own prior.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ArmSpec {
    pub(super) name: String,
    /// This arm's pretrained prior (default: the study's `main`); relative paths from the study
    /// file's folder. Its model description decides the networks, as for the study's prior.
    pub(super) main: Option<PathBuf>,
    /// Run-file keys, as in a run file (`set.train.mode = "baseline"`,
    /// `[arm.set.model.decoder] hook = "mid"`).
    #[serde(default)]
    set: toml::Table,
}

/// One run of the grid.
pub(super) struct PlannedRun {
    pub(super) arm: String,
    pub(super) seed: u64,
    /// The resolved run file (base + arm + seed), as TOML, after a comment naming the prior.
    pub(super) run_file: String,
    pub(super) file: RunFile,
    /// The arm's prior.
    pub(super) main: PathBuf,
}

impl PlannedRun {
    pub(super) fn dir(&self, out: &Path) -> PathBuf {
        out.join(&self.arm).join(format!("seed-{}", self.seed))
    }
}

/// Every run, each run file resolved and checked before anything trains.
pub(super) fn plan(
    study: &StudyFile,
    base: &toml::Table,
    main: &Path,
    main_label: Option<&str>,
    origin: &Path,
    relative: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<PlannedRun>> {
    let origin = origin.display();
    if study.seeds.is_empty() || study.arms.is_empty() {
        bail!("study file {origin}: needs at least one seed and one [[arm]]");
    }
    if study.validation_steps == 0 {
        bail!("study file {origin}: validation_steps must be at least 1");
    }
    if study.thresholds.iter().any(|t| !(0.0..=1.0).contains(t)) {
        bail!("study file {origin}: thresholds are IoUs in [0, 1]");
    }
    let mut seeds = study.seeds.clone();
    seeds.sort_unstable();
    seeds.dedup();
    if seeds.len() != study.seeds.len() {
        bail!("study file {origin}: a seed is listed twice");
    }
    let mut names = std::collections::HashSet::new();
    let mut plan = Vec::new();
    for arm in &study.arms {
        let valid = !arm.name.is_empty()
            && arm.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !arm.name.starts_with('.');
        if !valid {
            bail!("study file {origin}: arm name {:?} must be letters, digits, '-' or '_'", arm.name);
        }
        if !names.insert(arm.name.as_str()) {
            bail!("study file {origin}: arm {:?} is defined twice", arm.name);
        }
        // The prior is part of the settings (a run whose prior changed is not resumed), named by
        // its path, or by `main_label` for the study's default (the shipped prior: by digest,
        // so that the study resumes wherever its folder is).
        let (main, label) = match arm.main.as_deref().map(relative) {
            Some(path) => (path.clone(), path.display().to_string()),
            None => (main.to_path_buf(), main_label.map_or_else(|| main.display().to_string(), str::to_string)),
        };
        if !main.is_file() {
            bail!("study file {origin}: the prior {} of arm {:?} does not exist", main.display(), arm.name);
        }
        // Its contents, not its path, are what a finished run is compared by.
        let prior_digest = lisa_trainer::weights::digest(
            &std::fs::read(&main).with_context(|| format!("cannot read the prior {}", main.display()))?,
        );
        for &seed in &study.seeds {
            let mut table = base.clone();
            merge(&mut table, &arm.set);
            let train = table.entry("train").or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(train) = train.as_table_mut() else {
                bail!("study file {origin}: [train] of arm {:?} is not a table", arm.name);
            };
            // The seed is the study's: an arm may not pin it.
            train.insert("seed".into(), toml::Value::Integer(seed as i64));
            let run_file = toml::to_string(&table)?;
            let mut file = RunFile::from_toml(&run_file, &format!("study file {origin}, arm {:?}", arm.name))?;
            file.resolve_model(&main)?;
            let run_file = format!("# prior: {label}\n# prior sha256: {prior_digest}\n{run_file}");
            plan.push(PlannedRun { arm: arm.name.clone(), seed, run_file, file, main: main.clone() });
        }
    }
    Ok(plan)
}

/// A run file as a study keeps it (`run.toml`): the prior's name and digest, then the
/// resolved run file.
pub(super) struct KeptRunFile {
    /// The prior's SHA-256 (None in files written before it was recorded).
    pub(super) prior_digest: Option<String>,
    /// The prior's name (a path, or the shipped prior's label).
    pub(super) prior: String,
    /// The run file's keys.
    pub(super) settings: toml::Table,
}

impl KeptRunFile {
    /// Reads the text [`plan`] writes.
    pub(super) fn parse(text: &str) -> Result<Self> {
        let mut prior = String::new();
        let mut prior_digest = None;
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("# prior sha256: ") {
                prior_digest = Some(d.trim().to_string());
            } else if let Some(p) = line.strip_prefix("# prior: ") {
                prior = p.to_string();
            }
        }
        Ok(Self { prior_digest, prior, settings: toml::from_str(text)? })
    }

    /// What differs from `now` (the study file's plan for the same run), by key: the prior
    /// by its digest (by its name where a file has no digest), every setting.
    pub(super) fn differences(&self, now: &KeptRunFile) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let prior_differs = match (&self.prior_digest, &now.prior_digest) {
            (Some(a), Some(b)) => a != b,
            _ => self.prior != now.prior,
        };
        if prior_differs {
            out.push(format!("the prior: {} vs {}", self.prior, now.prior));
        }
        let json = |t: &toml::Table| serde_json::to_value(t);
        out.extend(lisa_trainer::differences::differences(&json(&self.settings)?, &json(&now.settings)?));
        Ok(out)
    }
}

/// `over` merged into `into`, tables key by key, other values replaced.
fn merge(into: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}
