//! The samplers against diffusers: tests/data/scheduler_reference.json, written once by
//! scripts/scheduler_reference.py with diffusers 0.42.1 (see there for what it holds).
//! Time steps must be equal; sampler updates equal to 1e-4 relative (diffusers computes
//! in f32, the runtime in f64 per element).

use serde_json::Value;
use tfmqc_runtime::sampler::{timesteps, Sampler, SamplerState};
use tfmqc_runtime::SchedulerConfig;

fn reference() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/scheduler_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("JSON")
}

fn config(r: &Value, group: &str, name: &str) -> SchedulerConfig {
    let map = r[group][name].as_object().expect("a config object");
    SchedulerConfig::from_map(map, name).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // Relative to each value, with the sample's own magnitude as the floor (a value near
    // zero among large ones carries their rounding).
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let mut worst = 0f32;
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1e-2 * scale);
        worst = worst.max(err);
        assert!(
            err <= 1e-4,
            "{what}[{k}]: tfmqc {g}, diffusers {w} (relative error {err:.2e})"
        );
    }
    if std::env::var_os("TFMQC_SHOW_ERRORS").is_some() {
        eprintln!("{what}: worst relative error {worst:.2e}");
    }
}

#[test]
fn time_steps_equal_diffusers_for_every_sampler_config_and_step_count() {
    let r = reference();
    let mut checked = 0;
    for e in r["timesteps"].as_array().unwrap() {
        let cname = e["config"].as_str().unwrap();
        let sampler: Sampler = e["sampler"].as_str().unwrap().parse().unwrap();
        let steps = e["steps"].as_u64().unwrap() as usize;
        let c = config(&r, "configs", cname);
        let what = format!("{cname} {sampler} {steps}");
        let got = timesteps(sampler, &c, steps);
        if e["whole"].as_bool().unwrap() {
            let want: Vec<i64> = e["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(
                got.unwrap_or_else(|e| panic!("{what}: {e}")),
                want,
                "{what}"
            );
        } else {
            // Fractional time steps (Euler, linspace): refused, never rounded silently.
            let err = got.expect_err(&what).to_string();
            assert!(err.contains("fractional"), "{what}: {err}");
        }
        checked += 1;
    }
    assert!(checked >= 100, "{checked} lists");
}

#[test]
fn sampler_updates_equal_diffusers_along_whole_trajectories() {
    let r = reference();
    let per_sample = r["shape"].as_array().unwrap()[1..]
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .product::<usize>();
    let steps = r["update_steps"].as_u64().unwrap() as usize;
    let noise = floats(&r["noise"]);
    let outputs: Vec<Vec<f32>> = r["model_outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let ddpm_noise: Vec<Vec<f32>> = r["ddpm_noise"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let mut checked = 0;
    for e in r["trajectories"].as_array().unwrap() {
        let cname = e["config"].as_str().unwrap();
        let sampler: Sampler = e["sampler"].as_str().unwrap().parse().unwrap();
        let c = config(&r, "update_configs", cname);
        let what = format!("{cname} {sampler}");
        let mut s = SamplerState::new(sampler, &c, steps).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want_ts: Vec<i64> = e["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), &want_ts[..], "{what}: time steps");
        let sigma = e["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - sigma).abs() <= 1e-5 * sigma,
            "{what}: init_noise_sigma {} vs {sigma}",
            s.init_noise_sigma()
        );
        let mut x: Vec<f32> = noise
            .iter()
            .map(|&v| (v as f64 * s.init_noise_sigma()) as f32)
            .collect();
        assert_close(&format!("{what}: initial"), &x, &floats(&e["initial"]));
        let inputs = e["model_inputs"].as_array();
        for k in 0..steps {
            if let Some(inputs) = inputs {
                assert_close(
                    &format!("{what}: model input {k}"),
                    &s.model_input(&x),
                    &floats(&inputs[k]),
                );
            }
            s.step_with_noise(&outputs[k], &mut x, per_sample, Some(&ddpm_noise[k]))
                .unwrap();
            assert_close(&format!("{what}: step {k}"), &x, &floats(&e["samples"][k]));
        }
        assert!(s.done());
        checked += 1;
    }
    assert!(checked >= 20, "{checked} trajectories");
}
