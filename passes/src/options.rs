//! Pipeline options and the finite time-step set S.

use crate::error::{Error, Result};
use crate::ir::Model;

/// Metadata keys tfmqc reads (written by model exporters or by tfmqc itself).
pub mod meta {
    pub const TRAIN_TIMESTEPS: &str = "diffusion.train_timesteps";
    pub const BETA_SCHEDULE: &str = "diffusion.beta_schedule";
    pub const BETA_START: &str = "diffusion.beta_start";
    pub const BETA_END: &str = "diffusion.beta_end";
    /// Written by tfmqc: the time-step set, comma-separated.
    pub const TIMESTEPS: &str = "tfmqc.timesteps";
    pub const TIMESTEP_INPUT: &str = "tfmqc.timestep_input";
    pub const TIB_FRONTIER: &str = "tfmqc.tib.frontier";
    pub const VERSION: &str = "tfmqc.version";
    pub const PASSES: &str = "tfmqc.passes";
}

/// Options every pass may read. The CLI fills them; defaults are the documented ones.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--timesteps`: `1000`, `ddim:50` or an explicit list. `None`: metadata, else 1000.
    pub timesteps: Option<String>,
    /// `--timestep-input`: skip detection and use this graph input.
    pub timestep_input: Option<String>,
}

/// The number of training time steps T: the model's metadata, else 1000.
pub fn train_timesteps(model: &Model) -> Result<usize> {
    match model.metadata_value(meta::TRAIN_TIMESTEPS) {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "metadata {} = '{v}' is not a positive integer",
                    meta::TRAIN_TIMESTEPS
                ))
            }),
        None => Ok(1000),
    }
}

/// Parses a time-step set: `N` (0..N-1), `ddim:N` (k·T/N for k < N) or `a,b,c`.
/// The result is sorted, without duplicates, and inside 0..T.
pub fn parse_timesteps(spec: &str, train_timesteps: usize) -> Result<Vec<i64>> {
    let t = train_timesteps as i64;
    let spec = spec.trim();
    let bad = |why: String| Error::invalid(format!("--timesteps '{spec}': {why}"));
    let mut set: Vec<i64> = if let Some(n) = spec.strip_prefix("ddim:") {
        let n: i64 = n
            .trim()
            .parse()
            .map_err(|_| bad("ddim:N needs a whole number N".into()))?;
        if n <= 0 || n > t {
            return Err(bad(format!("ddim:N needs 1 ≤ N ≤ T = {t}")));
        }
        (0..n).map(|k| k * t / n).collect()
    } else if spec.contains(',') {
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("'{}' is not a whole number", s.trim())))
            })
            .collect::<Result<_>>()?
    } else {
        let n: i64 = spec
            .parse()
            .map_err(|_| bad("expected N (0..N-1), ddim:N, or a comma-separated list".into()))?;
        if n > t {
            return Err(bad(format!(
                "0..{} goes past the model's T = {t} training steps",
                n - 1
            )));
        }
        (0..n).collect()
    };
    if set.is_empty() {
        return Err(bad("the time-step set is empty".into()));
    }
    if let Some(&v) = set.iter().find(|&&v| v < 0 || v >= t) {
        return Err(bad(format!(
            "time step {v} is outside the model's range 0..{}",
            t - 1
        )));
    }
    set.sort_unstable();
    set.dedup();
    Ok(set)
}

/// S for a model: `--timesteps`, else the set recorded by an earlier tfmqc run, else
/// all T training steps.
pub fn timestep_set(model: &Model, options: &Options) -> Result<Vec<i64>> {
    let t = train_timesteps(model)?;
    if let Some(spec) = &options.timesteps {
        return parse_timesteps(spec, t);
    }
    if let Some(recorded) = model.metadata_value(meta::TIMESTEPS) {
        return parse_timesteps(recorded, t);
    }
    parse_timesteps(&t.to_string(), t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_subset_is_k_times_t_over_n() {
        let s = parse_timesteps("ddim:50", 1000).unwrap();
        assert_eq!(s.len(), 50);
        assert_eq!(&s[..3], &[0, 20, 40]);
        assert_eq!(*s.last().unwrap(), 980);
    }

    #[test]
    fn count_means_all_steps_below_it() {
        assert_eq!(parse_timesteps("4", 1000).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn explicit_list_is_sorted_and_deduplicated() {
        assert_eq!(
            parse_timesteps("40, 0,20,20", 1000).unwrap(),
            vec![0, 20, 40]
        );
    }

    #[test]
    fn values_outside_the_schedule_are_rejected() {
        let e = parse_timesteps("0,1000", 1000).unwrap_err().to_string();
        assert!(e.contains("outside the model's range 0..999"), "{e}");
        assert!(parse_timesteps("2000", 1000).is_err());
        assert!(parse_timesteps("-1,3", 1000).is_err());
    }

    #[test]
    fn empty_and_malformed_sets_are_rejected() {
        assert!(parse_timesteps(",", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("0", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("ddim:x", 1000).is_err());
        assert!(parse_timesteps("abc", 1000).is_err());
    }
}
