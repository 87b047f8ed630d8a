/*
 * denoise.c: a tfmqc-compiled denoiser from C, the code an edge application copies.
 *
 * Build and run (from the repository root; the model made by
 * `tfmqc models/ddpm_digits.onnx -o target/ddpm_digits.q.onnx`):
 *
 *     cargo build --release -p tfmqc-runtime --example tfmqc
 *     cc runtime/examples/denoise.c -I runtime/include -L target/release/examples -ltfmqc \
 *        -Wl,-rpath,$PWD/target/release/examples -o target/denoise
 *     target/denoise target/ddpm_digits.q.onnx
 *
 * It calls the model once on a fixed input at the largest time step of S and prints a
 * checksum of the prediction (FNV-1a over the floats' bits; the Rust API gives the same
 * bits: tests/c_api.rs checks it), then samples one image with STEPS (default 20) DDIM
 * steps: `denoise MODEL.onnx [STEPS]`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tfmqc.h"

/* FNV-1a (64 bits) over the bit patterns of n floats, little end first. */
static uint64_t checksum(const float *v, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, &v[i], sizeof bits);
    for (int b = 0; b < 4; b++) {
      h ^= (bits >> (8 * b)) & 0xff;
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

static int fail(const char *what) {
  fprintf(stderr, "denoise: %s: %s\n", what, tfmqc_last_error());
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 2 && argc != 3) {
    fprintf(stderr, "usage: %s MODEL.onnx [STEPS]\n", argv[0]);
    return 2;
  }
  size_t steps = argc == 3 ? (size_t)strtoul(argv[2], NULL, 10) : 20;
  tfmqc_denoiser *model = NULL;
  if (tfmqc_load(argv[1], &model) != TFMQC_OK) return fail("load");
  tfmqc_set_threads(model, 1);

  size_t chw[3];
  if (tfmqc_sample_shape(model, chw) != TFMQC_OK) return fail("sample shape");
  size_t n_t = tfmqc_timestep_count(model);
  int64_t *ts = malloc(n_t * sizeof *ts);
  if (tfmqc_timesteps(model, ts, n_t) != TFMQC_OK) return fail("time steps");
  if (tfmqc_conditioning_count(model) != 0) {
    fprintf(stderr, "denoise: this example runs unconditional models (the model wants %s)\n",
            tfmqc_conditioning_name(model, 0));
    return 2;
  }

  /* One step on a fixed batch of 2: x[i] = (i * 7919 mod 2001) / 1000 - 1. */
  size_t shape[4] = {2, chw[0], chw[1], chw[2]};
  size_t n = shape[0] * shape[1] * shape[2] * shape[3];
  float *x = malloc(n * sizeof *x), *eps = malloc(n * sizeof *eps);
  for (size_t i = 0; i < n; i++) x[i] = (float)((i * 7919) % 2001) / 1000.0f - 1.0f;
  int64_t t = ts[n_t - 1];
  if (tfmqc_denoise(model, x, shape, t, NULL, 0, eps, n) != TFMQC_OK) return fail("denoise");
  printf("model: %zu time steps (%" PRId64 "..%" PRId64 "), sample [%zu, %zu, %zu]\n", n_t,
         ts[0], ts[n_t - 1], chw[0], chw[1], chw[2]);
  printf("denoise t=%" PRId64 " checksum %016" PRIx64 "\n", t, checksum(eps, n));

  /* A time step outside S is refused before anything runs. */
  if (tfmqc_denoise(model, x, shape, ts[0] + 1, NULL, 0, eps, n) == TFMQC_ERROR_BAD_INPUT)
    printf("t=%" PRId64 " refused: %s\n", ts[0] + 1, tfmqc_last_error());

  /* A whole sampling loop: one image, `steps` DDIM steps, seed 0. */
  size_t m = chw[0] * chw[1] * chw[2];
  float *image = malloc(m * sizeof *image);
  if (tfmqc_sample(model, 0, steps, TFMQC_SAMPLER_DDIM, 1, NULL, 0, 0.0f, NULL, 0, image, m) !=
      TFMQC_OK)
    return fail("sample");
  printf("sample ddim %zu steps seed 0 checksum %016" PRIx64 "\n", steps, checksum(image, m));

  free(image);
  free(eps);
  free(x);
  free(ts);
  tfmqc_free(model);
  return 0;
}
