//! The model metadata keys (ONNX `metadata_props`) tfmqc reads and writes: the one table
//! of them, which the compiler (`tfmqc_passes::options::meta`) re-exports.

/// Written by model exporters: the training noise schedule (the flat form diffusers'
/// scheduler config is read from when `tfmqc.schedule` is absent).
pub const TRAIN_TIMESTEPS: &str = "diffusion.train_timesteps";
pub const BETA_SCHEDULE: &str = "diffusion.beta_schedule";
pub const BETA_START: &str = "diffusion.beta_start";
pub const BETA_END: &str = "diffusion.beta_end";
pub const PREDICTION_TYPE: &str = "diffusion.prediction_type";
/// Written by model exporters: the shape of one sample (comma-separated dims).
pub const SAMPLE_SHAPE: &str = "diffusion.sample_shape";
/// Written by tfmqc: the time-step set, comma-separated.
pub const TIMESTEPS: &str = "tfmqc.timesteps";
pub const TIMESTEP_INPUT: &str = "tfmqc.timestep_input";
pub const TIB_FRONTIER: &str = "tfmqc.tib.frontier";
pub const VERSION: &str = "tfmqc.version";
pub const PASSES: &str = "tfmqc.passes";
pub const OPTIONS: &str = "tfmqc.options";
/// Written by tfmqc: the scheduler of a compiled model (diffusers' JSON).
pub const SCHEDULE: &str = "tfmqc.schedule";
pub const SEED: &str = "tfmqc.calibration_seed";
/// Written by tfmqc: the sampler calibration ran (`ddim`, `ddpm`, `euler`, `dpm++`)
/// and the step counts it calibrated at (comma-separated).
pub const SAMPLER: &str = "tfmqc.sampler";
pub const SAMPLING_STEPS: &str = "tfmqc.sampling_steps";
