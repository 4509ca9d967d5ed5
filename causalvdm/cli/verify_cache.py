"""Check that chunk-by-chunk generation through the shared KV cache computes what the model would
compute without it: the recompute baseline before the first eviction, a naive keep-everything cache
after it. Weights are seeded random (all of them), so an equality is not that of two zero outputs.

    python tools/verify_cache.py --config configs/debug/tiny.py [--ar-steps 12] [--tpe-mode cyclic] [--dtype bfloat16]

In float32 the two must agree to --tol (1e-4, absolute). In bfloat16 (weights and cache) the two orders of
summation round differently, so the bound is relative: at most --bf16-tol (2^-6, two bf16 steps) of the largest
output magnitude.
"""

import logging
import sys

import torch

import causalvdm
from causalvdm.cli.common import ArgumentParser, non_negative_float, non_negative_int, one_line_errors, positive_int
from causalvdm.config import add_config_args, load_config, require
from causalvdm.models.cache_check import verify
from causalvdm.models.layout import check_layout
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import ConfigError

log = logging.getLogger("verify_cache")


def main(argv=None) -> int:
    """Compare the cache with its references for `argv` (default: the command line) -> 0 within tolerance, else 1."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="mmengine config with a `model` field")
    parser.add_argument("--ar-steps", type=positive_int, default=12, help="autoregressive chunks to generate "
                        "(default 12)")
    parser.add_argument("--tpe-mode", choices=["absolute", "cyclic", "rope"], help="override model.tpe_mode")
    parser.add_argument("--spatial-prefix", help="override model.spatial_prefix: none, first_frame or prev_frames_N "
                        "(the chunk's spatial attention also reads frame 0 or the N frames before it)")
    parser.add_argument("--chunk", type=positive_int, default=8, help="frames per chunk, k (default 8)")
    parser.add_argument("--max-cond", type=positive_int, default=25, help="cache capacity in frames (default 25)")
    parser.add_argument("--first-frames", type=positive_int, default=1, help="clean frames given at the start "
                        "(default 1)")
    parser.add_argument("--denoise-calls", type=positive_int, default=3, help="model calls per chunk (default 3)")
    parser.add_argument("--latent-size", type=positive_int, nargs=2, metavar=("H", "W"),
                        help="latent height and width (default: the config's latent_size, else 4 4)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the weights and the cache (default float32)")
    parser.add_argument("--tol", type=non_negative_float, default=1e-4, help="float32: largest allowed abs "
                        "difference (default 1e-4)")
    parser.add_argument("--bf16-tol", type=non_negative_float, default=2**-6, help="bfloat16: largest allowed "
                        "difference relative to the largest output magnitude (default 2^-6 = 0.0156)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with one_line_errors(ConfigError):  # these errors name the file
        cfg = load_config(args.config, args.cfg_options)
        require(cfg, "model")
    with one_line_errors(ConfigError, prefix=f"{args.config}: "):
        if args.tpe_mode:
            cfg.model.tpe_mode = args.tpe_mode
        if args.spatial_prefix:
            cfg.model.spatial_prefix = None if args.spatial_prefix == "none" else args.spatial_prefix
        model = causalvdm.build_model(cfg.model)
    randomize_weights(model, seed=args.seed).eval().to(getattr(torch, args.dtype))
    latent_size = args.latent_size or tuple(cfg.get("latent_size", (4, 4)))

    try:
        check_layout(model, args.chunk, args.max_cond)
    except ValueError as err:
        sys.exit(f"error: {args.config}: --chunk {args.chunk} --max-cond {args.max_cond}: {err}")
    steps = args.ar_steps
    if model.tpe_mode == "absolute":
        fit = (model.max_tpe_len - args.first_frames) // args.chunk
        if fit < 1:  # no step would compare anything, and that is no pass
            sys.exit(f"error: {args.config}: absolute TPE covers {model.max_tpe_len} frames, too few for "
                     f"--first-frames {args.first_frames} and one --chunk of {args.chunk}")
        if steps > fit:
            log.info("absolute TPE covers %d frames: running %d steps instead of %d", model.max_tpe_len, fit, steps)
            steps = fit
    log.info("tpe_mode=%s spatial_prefix=%s chunk=%d max_cond=%d max_tpe_len=%d latent=%s dtype=%s", model.tpe_mode,
             model.spatial_prefix, args.chunk, args.max_cond, model.max_tpe_len, latent_size, args.dtype)
    results = verify(model, steps, args.chunk, args.max_cond, latent_size, args.first_frames,
                     args.denoise_calls, seed=args.seed)
    for r in results:
        log.info("step %2d  frames %3d-%3d  cached %2d  reference %-9s  max_abs_diff=%.3e",
                 r["step"], r["first"], r["first"] + args.chunk - 1, r["cached"], r["reference"], r["max_abs_diff"])
    worst = max(r["max_abs_diff"] for r in results)
    relative = worst / max(r["scale"] for r in results)
    print(f"max_abs_diff={worst:.3e} max_rel_diff={relative:.3e}")
    return 0 if (relative <= args.bf16_tol if args.dtype == "bfloat16" else worst <= args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
