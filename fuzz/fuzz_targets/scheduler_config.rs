//! A diffusers scheduler_config.json (`--scheduler`, and the copy recorded in a compiled
//! model's metadata), then what is computed from it: the noise schedule and every
//! sampler's time steps and first updates at a few step counts.

use tfmqc_runtime::{NoiseRng, Sampler, SamplerState, SchedulerConfig};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = SchedulerConfig::from_json(text, "fuzz.json") else {
        return;
    };
    let _ = config.schedule();
    let _ = config.to_json();
    for sampler in Sampler::ALL {
        for steps in [1, 2, 7, 50] {
            let Ok(mut state) = SamplerState::new(sampler, &config, steps) else {
                continue;
            };
            let mut rng = NoiseRng::new(0);
            let mut x = state.initial_sample(&mut rng, 4);
            while !state.done() {
                let out = state.model_input(&x);
                if state.step(&out, &mut x, 2, &mut rng).is_err() {
                    break;
                }
            }
        }
    }
}
