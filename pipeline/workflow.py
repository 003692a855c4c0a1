"""``mlc run``: the whole job in one command, each step reusing what is already done.

validate -> extract train and test -> fit-head (5 folds by default) -> submit -> report, ending with the
validation samples-F1, the submission and the report. With ``--finetune``, the CPU finetune route:
a trunk cache (the encoders' bottom run once), the encoders' top blocks finetuned over it starting
from the fitted head, and the test split encoded with the finetuned encoders.

This module sits above the stages (like the CLI): it is the one place that chains them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import OutputOptions, write_json
from .cache import read_meta
from .config import Config, borrow, flatten, group, opt, require
from .crossfit import CrossfitConfig, crossfit
from .data import DataDir, DataOptions
from .encoders import EncoderOptions
from .errors import MlcError
from .extract import ExtractConfig, extract
from .features import LoaderOptions
from .finetune import FinetuneConfig, finetune
from .fit_head import FitHeadConfig, fit_head, sized
from .folders import sha256_file
from .heads import HEADS, HeadOptions
from .heartbeat import announcer
from .log import get
from .pseudo import DEFAULT_CONFIDENCE
from .quantize import PrecisionOptions
from .reading import JSON_BYTES, read_text
from .replay import RUN_RECIPE
from .report import make_report
from .runs import Contract, RunDir, data_inputs
from .submit import SubmitConfig, submit
from .training import TrainOptions
from .validate import format_report, validate_data_dir

# The CPU finetune route, by image encoder. lite0's is the best bench/recipes.py found on the shared subset
# (train ids 0-9999, scored on 10000-11999: 0.8721, against 0.8750 for the frozen 5-fold head, which is
# why --finetune is off by default); the others cut at the same depth (the last stage and the head conv).
TRUNK_ROUTE: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {"image_cut": "block13", "epochs": 2, "lr": 1e-3, "encoder_lr": 3e-4},
    "efficientnet-lite2": {"image_cut": "block18", "epochs": 2, "lr": 1e-3, "encoder_lr": 3e-4},
    "resnet50": {"image_cut": "layer3", "epochs": 2, "lr": 1e-3, "encoder_lr": 3e-4},
}
TEXT_CUTS = {"minilm-l6": "layer4", "bert-base-uncased": "layer10"}

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """Options of ``mlc run``."""

    data_dir: Path = opt(None, "Data folder: train.csv, test.csv and the images (in data/, images/ or beside).",
                         argument=True, required=True)
    out: Path | None = opt(None, "Run folder (default runs/DATA_NAME-IMAGE-TEXT, after the data folder and encoders): "
                           "a new or empty folder, or a run it replaces.")
    cache_dir: Path = opt(Path("cache"), "Where caches are written.")
    folds: int = borrow(FitHeadConfig, "folds", 5)
    head: str = borrow(HeadOptions, "head", "concat")
    # the head's training (fit-head's options; None: from the row count, training.sized_training)
    batch_size: int | None = borrow(TrainOptions, "batch_size", None)
    epochs: int | None = borrow(TrainOptions, "epochs", None)
    lr: float | None = opt(None, "The head's learning rate (default: fit-head's).")
    loss: str | None = opt(None, "The head's loss: bce, soft-margin or asl (default: fit-head's).")
    dropout: float | None = opt(None, "The head's dropout (default: fit-head's).")
    seed: int = borrow(TrainOptions, "seed", 0)
    decision: str = borrow(FitHeadConfig, "decision", "auto")
    crossfit_text: bool = opt(False, "Also finetune the caption tower on 5 folds (`mlc crossfit`: each row encoded by "
                              "the fold model that did not train on it, the test split by their mean) and fuse its "
                              "features with the frozen ones. Off by default (docs/recipes.md).")
    finetune: bool = opt(False, "Then finetune the encoders' top blocks over a trunk cache (the CPU route: "
                         "minutes per epoch) from a one-split head, and submit with the finetuned encoders. "
                         "Off by default: on 10,000 images it scored 0.872, the frozen 5-fold head 0.875.")
    quality: str = opt("fast", "fast: one head (the default, minutes on a CPU); best: several heads over the main "
                       "encoders' cache, the image encoder's token maps (--attention), an extra text encoder's "
                       "(--extra-text-encoder) or image encoder's (--extra-image-encoder) and fused ones, blended with "
                       "weights learned on their out-of-fold probabilities, members in RUN/members (docs/recipes.md).")
    time_limit: float = opt(0.0, "With --quality best: seconds after which no more members are fitted (the blend "
                            "keeps those already there); 0: no limit.")
    extra_image_encoder: str = opt("auto", "With --quality best: the image encoder of a second cache (auto: "
                                   "efficientnet-lite2 beside efficientnet-lite0 with --no-attention, none "
                                   "otherwise; or a name, or 'none').")
    extra_text_encoder: str = opt("auto", "With --quality best: another text encoder whose caption vectors feed more "
                                  "members (auto: mpnet-base when registered and its weights are installed, none "
                                  "otherwise; or a name, or 'none').")
    attention: bool = opt(True, "With --quality best: a member that is the attention head over the image encoder's "
                          "token maps (a second cache, --image-pooling tokens; the slowest member, ~14x a pooled one). "
                          "The blend then reads the token map and its pooled members the map's mean, so the export "
                          "stays one graph; no second image encoder beside it.")
    pseudo_label: bool = opt(False, "With --quality best: self-training. After the members, label the test rows "
                             "that each fold's heads are confident about, refit every member (NAME-pl) with them on "
                             "each fold's training side (never held out), and blend both rounds "
                             "(docs/recipes.md).")
    pseudo_confidence: float = opt(DEFAULT_CONFIDENCE, "With --pseudo-label: a test row is kept when every label's "
                                   "probability is at least this or at most 1 minus this, and one label is at least "
                                   "this.")
    overwrite: bool = opt(False, "Rebuild the caches whose data changed (train.csv, test.csv or their images), then "
                          "refit and resubmit what depends on them, instead of stopping (naming the cache).")
    output: OutputOptions = group(OutputOptions)
    data: DataOptions = group(DataOptions)
    loader: LoaderOptions = group(LoaderOptions)
    numerics: PrecisionOptions = group(PrecisionOptions)
    encoders: EncoderOptions = group(EncoderOptions)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """--out defaults to runs/DATA_NAME-IMAGE-TEXT."""
        values = super().coerce(values)
        if values.get("out") is None and values.get("data_dir") is not None:
            enc = values.get("encoders") or EncoderOptions()
            name = f"{values['data_dir'].resolve().name}-{enc.image_encoder}-{enc.text_encoder}"
            values["out"] = Path("runs") / name.replace(":", "-").replace("/", "-")
        return values

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.data_dir is not None, "give the data folder"),
                 (not (self.crossfit_text and self.finetune), "--crossfit-text and --finetune are two routes past the "
                  "frozen features: choose one"),
                 (not (self.head == "attention" and self.finetune), "--finetune trains its own head over a trunk "
                  "cache; --head attention is a head over frozen token maps: choose one"),
                 (self.quality in ("fast", "best"), "--quality must be fast or best"),
                 (self.quality == "fast" or not (self.finetune or self.crossfit_text or self.head != "concat"),
                  "--quality best chooses its own heads and routes: leave out --head, --finetune and --crossfit-text"),
                 (self.time_limit >= 0, "--time-limit must be 0 (none) or a number of seconds"),
                 (self.quality == "best" or not self.pseudo_label, "--pseudo-label is part of --quality best"),
                 (0.5 < self.pseudo_confidence < 1, "--pseudo-confidence must be between 0.5 and 1"),
                 (not (self.attention and self.quality == "best"
                       and self.extra_image_encoder not in ("auto", "none", self.encoders.image_encoder)),
                  "--extra-image-encoder NAME needs --no-attention: the attention member's token map and a "
                  "second image encoder's vectors cannot feed one graph (the export)")])


_say = announcer(logger, "mlc run")


_UNSTORED = ("kind", "force")  # config.json keys that do not change what a run holds


def _up_to_date(run: RunDir, config: dict[str, Any], caches: list[Path]) -> bool:
    """The run folder holds a complete run of this very config over these caches, made from the data they hold
    now (the same data fingerprint: train.csv and its images unchanged since)."""
    try:
        loaded = run.load()
    except MlcError:
        return False
    stored = {k: v for k, v in flatten(loaded.config).items() if k not in _UNSTORED}  # mlc 0.2's runs are flat
    wanted = {k: v for k, v in flatten(json.loads(json.dumps(config))).items() if k not in _UNSTORED}
    if wanted != stored or len(loaded.features) != len(caches):
        return False
    metas = [read_meta(c) for c in caches]
    return all(Contract.from_dict(e.contract) == Contract.of_cache(m) and e.data_fingerprint == m.data_fingerprint
               for e, m in zip(loaded.entries, metas, strict=True))


def fit(cfg: RunConfig, caches: list[Path], out: Path, folds: int) -> None:
    rows = read_meta(caches[0]).num_records
    # every head trains with its registered recipe (none: the defaults; the attention head's: heads.AttentionHead),
    # its batch sized from the row count like every head's (training.sized_training)
    tuned = HEADS.about[cfg.head].recipe
    given = {k: getattr(cfg, k) for k in ("batch_size", "epochs", "lr", "loss", "dropout")
             if getattr(cfg, k) is not None}
    head_cfg = FitHeadConfig.build(caches=tuple(caches), out=out, folds=folds, head=cfg.head, output=cfg.output,
                                   seed=cfg.seed, decision=cfg.decision, **{**tuned, **given})
    head_cfg = sized(head_cfg, rows)  # as config.json will hold it
    if _up_to_date(RunDir(out), head_cfg.to_dict(), caches):
        _say(f"{out}: up to date (same options, same features); not refitted")
        return
    fit_head(head_cfg)


def finetune_route(cfg: RunConfig, train: list[Path]) -> Path:
    """Trunk cache -> finetune from a frozen head fitted on the finetune's own split -> a finetuned run folder.

    The 5-fold run cannot be the start: its heads trained on the rows the finetune holds out, which would
    bias the finetune's held-out F1 and its thresholds."""
    enc = cfg.encoders
    route, text_cut = TRUNK_ROUTE.get(enc.image_encoder), TEXT_CUTS.get(enc.text_encoder)
    if route is None or text_cut is None:
        raise MlcError(f"--finetune knows no trunk cut for {enc.image_encoder} + {enc.text_encoder}; use "
                       "`mlc extract --image-cut ... --text-cut ...` and `mlc finetune --from-cache ...` directly")
    (trunk,) = extract(ExtractConfig(data_dir=cfg.data_dir, splits=("train",), cache_dir=cfg.cache_dir,
                                     image_cut=route["image_cut"], text_cut=text_cut, overwrite=cfg.overwrite,
                                     encoders=enc, loader=cfg.loader, data=cfg.data))
    out = cfg.out.with_name(cfg.out.name + "-finetuned")
    if RunDir(out).manifest.is_file():
        if _finetuned_on(RunDir(out)) == read_meta(trunk).data_fingerprint:
            _say(f"{out}: already finetuned; delete it to finetune again")
            return out
        if not cfg.overwrite:
            raise MlcError(f"{out}: finetuned on other data than {trunk} holds now (train.csv or its images "
                           "changed); pass --overwrite to finetune it again")
        _say(f"{out}: finetuned on other data; finetuning again")
        shutil.rmtree(RunDir(out).checkpoints, ignore_errors=True)  # mlc's own, of that stale finetune
    start = cfg.out.with_name(cfg.out.name + "-split")
    _say(f"fitting the starting head on the finetune's split ({start})")
    fit(cfg, train, start, folds=0)
    finetune(FinetuneConfig.build(from_cache=trunk, out=out, init_head=start, epochs=route["epochs"],
                                  sampler="uniform", pos_weight=False, lr=route["lr"], encoder_lr=route["encoder_lr"],
                                  batch_size=32, workers=cfg.loader.workers, device=cfg.loader.device, head=cfg.head,
                                  output=cfg.output, encoders=enc))
    return out


def _finetuned_on(run: RunDir) -> str | None:
    try:
        return run.read_json("features.json")[0].get("data_fingerprint")
    except (MlcError, LookupError, AttributeError):
        return None


def _claim_outputs(cfg: RunConfig) -> None:
    """Every run folder this job writes, proved safe before any work: never the data or the caches, nor a folder
    that is no mlc run of its kind (``--out runs`` must not replace every run in it)."""
    inputs, force = [*data_inputs(DataDir.open(cfg.data_dir, cfg.data)), cfg.cache_dir], cfg.output.force
    RunDir(cfg.out).claim("head", inputs=inputs, force=force)
    if cfg.finetune:
        RunDir(cfg.out.with_name(cfg.out.name + "-split")).claim("head", inputs=inputs, force=force)
        RunDir(cfg.out.with_name(cfg.out.name + "-finetuned")).claim("finetune", inputs=inputs, force=force)


def _submission_current(run: RunDir, test_cache: Path) -> bool:
    """RUN/submission.csv was made by this very run from the test data as it is now (``test_cache`` was just
    checked against test.csv and its images by extract)."""
    if not run.submission.is_file():
        return False
    try:
        info = json.loads(read_text(run.submission_info, limit=JSON_BYTES))
        now = read_meta(test_cache).data_fingerprint
        return info["run_manifest"] == sha256_file(run.manifest) and bool(info["test"]) and \
            all(t["data_fingerprint"] == now for t in info["test"])
    except (OSError, ValueError, LookupError, TypeError, MlcError):
        return False  # none (an older mlc's), or damaged: make it again


def _record(cfg: RunConfig, final: Path) -> None:
    """run.json in the run folder(s): this job's options, paths resolved, so `mlc run --config RUN` replays it
    from any folder. Rewritten only when it changed (a rerun that did no work writes nothing)."""
    d = cfg.to_dict()
    d.update(data_dir=str(cfg.data_dir.resolve()), cache_dir=str(Path(cfg.cache_dir).resolve()),
             out=str(Path(cfg.out).resolve()))
    d.get("output", {}).pop("force", None)  # how this job was allowed to write, not what it made
    for folder in dict.fromkeys([cfg.out, final]):
        path = RunDir(folder) / RUN_RECIPE
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(d))
        except (OSError, ValueError):
            same = False
        if not same:
            write_json(path, d)


def run(cfg: RunConfig) -> dict[str, Any]:
    """The whole job; returns {"samples_f1", "run", "submission", "report"}."""
    _say(f"mlc run {cfg.data_dir} -> {cfg.out}")
    _claim_outputs(cfg)
    _say(f"validating {cfg.data_dir}")
    report = validate_data_dir(cfg.data_dir, csv_only=False, options=cfg.data, need_test=False)
    if not report.ok:
        logger.warning(format_report(report))
        raise MlcError(f"{cfg.data_dir}: {len(report.problems)} problem(s) in the data (listed above); fix them, "
                       "or run the stages one by one (mlc extract --skip-bad-images ...)")
    _say("extracting features (reused when already there)")
    encoders = cfg.encoders
    if cfg.head == "attention":  # the attention head reads the image encoder's token map, not its pooled vector
        encoders = encoders.replace(image_pooling="tokens")
    splits = ("train", "test") if DataDir.open(cfg.data_dir, cfg.data).has("test") else ("train",)
    if len(splits) == 1:
        _say("no test.csv: fitting without a submission")
    stage1 = ExtractConfig(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, overwrite=cfg.overwrite, splits=splits,
                           encoders=encoders, numerics=cfg.numerics, loader=cfg.loader, data=cfg.data)
    caches = dict(zip(stage1.splits, extract(stage1), strict=True))  # extract hands back one path per split
    train, test = [caches["train"]], caches.get("test")
    if cfg.crossfit_text:
        _say("cross-fitting the caption tower (reused when already there)")
        enc = cfg.encoders
        train.append(crossfit(CrossfitConfig.build(data_dir=cfg.data_dir, text_encoder=enc.text_encoder,
                                                   text_weights=enc.text_weights, random_init=enc.random_init,
                                                   cache_dir=cfg.cache_dir, device=cfg.loader.device,
                                                   overwrite=cfg.overwrite, data=cfg.data, precision=(
                                                       "bf16" if cfg.numerics.precision == "bf16" else "auto")))[0])
    if cfg.quality == "best":
        from .best_route import best_route  # it imports this module's reuse rule

        best_route(cfg, train, test)
    else:
        _say(f"fitting the head ({cfg.folds or 1} fold(s))")
        fit(cfg, train, cfg.out, cfg.folds)
    final = finetune_route(cfg, train) if cfg.finetune else cfg.out
    rd = RunDir(final)
    fresh = test is not None and not _submission_current(rd, test)
    if fresh:  # none yet, or made by an earlier run or from an earlier test.csv: never hand that one back
        _say("writing the submission")
        submit(SubmitConfig(run=final, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, overwrite=cfg.overwrite,
                            loader=cfg.loader))
    if fresh or not (rd.report / "report.html").is_file():  # the report shows the submission's labels too
        _say("writing the report")
        make_report(final)
    _record(cfg, final)
    metrics = rd.read_metrics()
    return {"samples_f1": metrics["samples_f1"], "run": final, "submission": rd.submission if test else None,
            "report": rd.report / "report.html"}
