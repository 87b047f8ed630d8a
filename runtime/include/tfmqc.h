/*
 * tfmqc.h: the C API of the tfmqc runtime (the crate tfmqc-runtime, src/capi.rs).
 *
 * Run diffusion denoisers compiled by tfmqc (or any ONNX denoiser) on a CPU: load a
 * model, call it once per denoising step into your own buffer, or run a whole sampling
 * loop. Build the library from the repository root and link it:
 *
 *     cargo build --release -p tfmqc-runtime --example tfmqc
 *     cc app.c -I runtime/include -L target/release/examples -ltfmqc
 *
 * (a static library: cargo rustc --release -p tfmqc-runtime --lib --crate-type staticlib,
 * then link target/release/libtfmqc_runtime.a with -lpthread -ldl -lm).
 * runtime/examples/denoise.c is a complete program.
 *
 * Conventions: every function that can fail returns a tfmqc_status; on failure,
 * tfmqc_last_error() gives the message (per thread). Arrays are C-order, owned by the
 * caller, with their shapes given beside them. A tfmqc_denoiser may be used by several
 * threads at once, except by tfmqc_set_threads and tfmqc_free.
 */
#ifndef TFMQC_H
#define TFMQC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
typedef int tfmqc_status;
#define TFMQC_OK 0
#define TFMQC_ERROR_IO 1               /* the file cannot be read */
#define TFMQC_ERROR_INVALID_MODEL 2    /* the file is not a denoiser the runtime can run */
#define TFMQC_ERROR_BAD_INPUT 3        /* the inputs do not fit the model (t outside S, a shape) */
#define TFMQC_ERROR_EXECUTION 4        /* the engine failed while running */
#define TFMQC_ERROR_INVALID_ARGUMENT 5 /* a NULL pointer, a buffer of the wrong size, ... */
#define TFMQC_ERROR_PANIC 6            /* a bug in tfmqc */

/* Element types of conditioning tensors. */
#define TFMQC_DTYPE_F32 1
#define TFMQC_DTYPE_F64 2
#define TFMQC_DTYPE_I32 3
#define TFMQC_DTYPE_I64 4

/* Samplers, as the diffusers schedulers of those names. */
#define TFMQC_SAMPLER_DDIM 0
#define TFMQC_SAMPLER_DDPM 1
#define TFMQC_SAMPLER_EULER 2
#define TFMQC_SAMPLER_DPMSOLVER_PP 3

/* A loaded denoiser. */
typedef struct tfmqc_denoiser tfmqc_denoiser;

/* A conditioning array (text embeddings, class labels, ...) for the model input `name`. */
typedef struct tfmqc_tensor {
  const char *name;
  int dtype;           /* TFMQC_DTYPE_* */
  const void *data;    /* C order, product(shape) elements */
  const size_t *shape;
  size_t rank;
} tfmqc_tensor;

/* The library's version, e.g. "0.1.0". */
const char *tfmqc_version(void);

/* The message of this thread's last failed call ("" before any failure). Valid until
 * the next failing call on this thread. */
const char *tfmqc_last_error(void);

/* Loads an ONNX denoiser into *out; free it with tfmqc_free. */
tfmqc_status tfmqc_load(const char *path, tfmqc_denoiser **out);

/* Frees a denoiser; NULL is ignored. */
void tfmqc_free(tfmqc_denoiser *model);

/* Threads of each call (default: every core; 1: the calling thread only). Results are
 * the same for any count. */
tfmqc_status tfmqc_set_threads(tfmqc_denoiser *model, size_t threads);

/* (C, H, W) of one sample into chw[3]. */
tfmqc_status tfmqc_sample_shape(const tfmqc_denoiser *model, size_t chw[3]);

/* |S|: how many time steps the model accepts. */
size_t tfmqc_timestep_count(const tfmqc_denoiser *model);

/* The time-step set S, ascending, into out (capacity >= tfmqc_timestep_count). */
tfmqc_status tfmqc_timesteps(const tfmqc_denoiser *model, int64_t *out, size_t capacity);

/* The conditioning inputs: how many, and the name of each (NULL past the end; the
 * string belongs to the model). */
size_t tfmqc_conditioning_count(const tfmqc_denoiser *model);
const char *tfmqc_conditioning_name(const tfmqc_denoiser *model, size_t index);

/* One denoiser call: the prediction for the batch x of shape[4] = {B, C, H, W} at time
 * step t (which must be in S), into out (out_len = B*C*H*W floats). cond: cond_count
 * conditioning tensors (NULL and 0 for an unconditional model). */
tfmqc_status tfmqc_denoise(const tfmqc_denoiser *model, const float *x, const size_t shape[4],
                           int64_t t, const tfmqc_tensor *cond, size_t cond_count,
                           float *out, size_t out_len);

/* A sampling loop: `batch` samples [batch, C, H, W] into out (out_len floats) from seeded
 * N(0, 1) noise, `steps` steps of `sampler` (TFMQC_SAMPLER_*) under the model's
 * scheduler. cond: the conditioning (batch rows, or fewer, cycled). guidance_scale > 0
 * with uncond (the unconditional conditioning, same names): classifier-free guidance;
 * else pass 0, NULL, 0. */
tfmqc_status tfmqc_sample(const tfmqc_denoiser *model, uint64_t seed, size_t steps,
                          int sampler, size_t batch, const tfmqc_tensor *cond,
                          size_t cond_count, float guidance_scale, const tfmqc_tensor *uncond,
                          size_t uncond_count, float *out, size_t out_len);

#ifdef __cplusplus
}
#endif

#endif /* TFMQC_H */
