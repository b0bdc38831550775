"""`gacq export`: a quantized checkpoint -> a real low-bit model folder (thin wrapper over gacq.export.export).

Registered on the main app by `gacq/cli.py` with `register(app)`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import GacqError


def _fail(e: GacqError) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def export_cmd(
    qdir: Path = typer.Argument(..., help="Quantized checkpoint folder (from `gacq quantize`)."),
    backend: str = typer.Option("auto", "--backend", help="auto (default: the backend that runs the checkpoint as calibrated with the fewest weight bytes, for its weight and input bits and formats), int8 (W<=8 A<=8, int32 GEMM), w4a8 (packed int4 weights x int8 activations), w4a16 (packed int4 weights, float activations), fp8 (FP8 E4M3 activations x FP8 weights, --format fp8, or x W4 integer weights, --act-format fp8) or w4fp8 (--act-format fp8 W4 weights packed two per byte, unpacked to FP8 per call)."),
    out: Path = typer.Option(..., "--out", help="Exported folder: QDIR's files + export.json."),
    device: str = typer.Option("auto", help="Where the agreement check runs: auto, cpu, cuda or cuda:N."),
    strict: bool = typer.Option(False, "--strict",
                                help="Refuse layers the backend cannot run instead of running them densely."),
    check_batches: int = typer.Option(2, min=1, help="Random batches of the check against the fake-quant model."),
    check_batch_size: int = typer.Option(4, min=1, help="Samples per check batch."),
    seed: int = typer.Option(0, min=0, help="Seed of the check's random inputs."),
) -> None:
    """Convert a quantized checkpoint for a real low-bit backend, check it against fake quantization, write OUT."""
    from .export import export
    from .utils import resolve_device

    try:
        info = export(qdir, backend, out, device=resolve_device(device), strict=strict, check_batches=check_batches,
                      check_batch_size=check_batch_size, seed=seed)
    except GacqError as e:
        _fail(e)
    from .export import ExportReport

    report = ExportReport(**info["report"])
    c = info["check"]
    typer.echo(f"{info['backend']}: {report.summary()}")
    typer.echo(f"check: {c['agree_fraction']:.0%} of {c['samples']} samples within {c['sample_rtol']:g} of the "
               f"fake-quant output, largest difference {c['max_rel_error']:.2g} of max |y|")
    if c.get("float64") and c["agree_fraction"] < c["min_agree"]:  # passed through check_failures' float64 rule
        f = c["float64"]
        typer.echo(f"       rounding flips: against a float64 run of fake quant {f['exported_agree_fraction']:.0%} "
                   f"agree (float32 fake quant: {f['fake_quant_agree_fraction']:.0%}), largest difference "
                   f"{f['exported_max_rel_error']:.2g} (fake quant: {f['fake_quant_max_rel_error']:.2g})")
    if c.get("layers"):
        lay = c["layers"]
        typer.echo(f"layers: {lay['layers']} exported layers on their fake-quant layers' inputs, largest difference "
                   f"{lay['max_rel_error']:.2g} of max |y| ({lay['worst_layer']}; allowed {c['layer_rtol']:g})")
    typer.echo(f"wrote {out}")


def bench_cmd(ctx: typer.Context) -> None:
    """Time the low-bit backends against bf16, side by side (`gacq bench --help` lists the options)."""
    from .bench import main

    main(list(ctx.args), prog="gacq bench")


def register(app: typer.Typer) -> None:
    """Add `gacq export` and `gacq bench` to the main app."""
    app.command("export")(export_cmd)
    # the options are the benchmark's own (argparse in gacq.bench), passed through untouched
    app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                           "help_option_names": []})(bench_cmd)
