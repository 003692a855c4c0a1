"""``mlc run --quality best``'s route, after the main caches are there: which extra caches it extracts (a second
image encoder's, the token maps for the attention member, an extra text encoder's), the members (best.plan), their
fit, with ``--pseudo-label`` their second round (pipeline/pseudo.py), and the blend (best.blend) in the run folder.

Like workflow.py this module sits above the stages; workflow imports it when ``--quality best`` is asked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .best import Member, blend, fit_members, plan, students
from .cache import read_meta
from .errors import MlcError
from .heartbeat import announcer
from .log import get
from .pseudo import Teacher, Unlabelled
from .runs import RunDir

# The image encoder a best run adds beside the main one (its own resolution, its own cache).
EXTRA_IMAGE = {"efficientnet-lite0": "efficientnet-lite2"}
EXTRA_TEXT = "mpnet-base"  # the text encoder a best run adds when its weights are installed (its own members)

logger = get(__name__)
_say = announcer(logger, "mlc run")


def extra_image(cfg: Any) -> str | None:
    """The image encoder of a best run's second cache, or None (always None beside the attention member: one
    graph reads one token map)."""
    name = cfg.extra_image_encoder
    if name == "auto":
        return None if cfg.attention else EXTRA_IMAGE.get(cfg.encoders.image_encoder)
    return None if name == "none" or name == cfg.encoders.image_encoder else name


def installed(name: str) -> bool:
    """Whether text encoder ``name`` is registered and its pretrained weights load here (no download): its spec's
    cheap check when it has one, else a build."""
    from .encoders.registry import create_encoder, get_spec, names

    if name not in names("text"):
        return False
    present = get_spec("text", name).present
    if present is not None:
        return present()
    try:
        create_encoder("text", name)
    except MlcError:
        return False
    return True


def extra_text(cfg: Any) -> str | None:
    """The text encoder of a best run's extra caption members, or None; ``auto`` says what it chose."""
    name = cfg.extra_text_encoder
    if name == "auto":
        # never with random weights (tests, speed runs): a random MPNet is slow and says nothing
        name = EXTRA_TEXT if cfg.encoders.text_encoder != EXTRA_TEXT and not cfg.encoders.random_init and \
            installed(EXTRA_TEXT) else "none"
        _say(f"extra text encoder: {name} (auto: {EXTRA_TEXT} when registered with its weights installed)")
    return None if name == "none" or name == cfg.encoders.text_encoder else name


def _caches(cfg: Any, train: list[Path], test: Path | None = None
            ) -> tuple[list[Path], int, int | None, list[int], list[Path] | None]:
    """A best run's train caches (extracted when missing): the main one, the extra image encoder's, the token
    maps', the extra text encoder's; with how many hold pooled images, the token cache's index and the texts'; and,
    with --pseudo-label and a test split (``test``: the main test cache), each one's test cache, else None."""
    from .extract import ExtractConfig, extract

    tests = [test] if cfg.pseudo_label and test is not None else None
    splits = ("train", "test") if tests else ("train",)

    def more(what: str, enc: Any) -> Path:
        _say(f"extracting {what} (reused when already there)")
        paths = extract(ExtractConfig(data_dir=cfg.data_dir, splits=splits, cache_dir=cfg.cache_dir,
                                      overwrite=cfg.overwrite, encoders=enc, numerics=cfg.numerics,
                                      loader=cfg.loader, data=cfg.data))
        if tests is not None:
            tests.append(paths[1])
        return paths[0]

    caches, tokens, texts = list(train), None, []
    if tests is not None:
        tests += [test] * (len(train) - 1)  # (a cross-fit's caption cache: never beside --quality best)
    extra = extra_image(cfg)
    if extra is not None:
        caches.append(more(f"the second image encoder's features ({extra})",
                           cfg.encoders.replace(image_encoder=extra, image_weights=None)))
    n_image = len(caches)
    if cfg.attention:
        tokens = len(caches)
        try:
            caches.append(more(f"{cfg.encoders.image_encoder}'s token maps for the attention member",
                               cfg.encoders.replace(image_pooling="tokens")))
        except MlcError as e:  # e.g. an encoder run whole has no token map: say how to go on without the member
            raise MlcError(f"{e} (the attention member of --quality best needs them; --no-attention leaves "
                           "it out)") from e
    text = extra_text(cfg)
    if text is not None:
        texts.append(len(caches))
        caches.append(more(f"the extra text encoder's caption features ({text})",
                           cfg.encoders.replace(text_encoder=text, text_weights=None)))
    return caches, n_image, tokens, texts, tests


def pseudo_round(members: Sequence[Member], caches: Sequence[Path], tests: Sequence[Path], out: Path, *, folds: int,
                 confidence: float, time_limit: float = 0.0, **fit: Any) -> list[Member]:
    """--pseudo-label's round two: each fitted member again (NAME-pl), each fold also training on the test rows
    that round one's heads of that fold label confidently (pipeline/pseudo.py). Returns the members fitted."""
    def unlabelled(idx: tuple[int, ...]) -> Unlabelled:
        return Unlabelled.load([tests[c] for c in idx])

    teach = Teacher.of(members, out, folds, unlabelled, confidence, sorted({p.name for p in tests}))
    _say(f"pseudo-labelling {read_meta(tests[0]).num_records} test rows (confidence {confidence}), then refitting "
         f"{len(members)} members")
    return fit_members(students(members), caches, out, folds=folds, time_limit=time_limit, teacher=teach, **fit)


def best_route(cfg: Any, train: list[Path], test: Path | None) -> dict[str, Any]:
    """``mlc run --quality best`` after the main caches are there (cfg: workflow.RunConfig): the extra caches (a
    second image encoder's, the token maps', a second text encoder's), the members, with --pseudo-label their
    second round, the blend in cfg.out. Returns ensemble.json's content."""
    caches, n_image, tokens, texts, tests = _caches(cfg, train, test)
    members = plan(n_image, tokens=tokens, texts=texts)
    (cfg.out / "members").mkdir(parents=True, exist_ok=True)
    _say(f"fitting up to {len(members)} members ({cfg.folds} folds each)"
         + (f" within {cfg.time_limit:.0f} s" if cfg.time_limit else ""))
    start = time.monotonic()
    done = fit_members(members, caches, cfg.out, folds=cfg.folds, time_limit=cfg.time_limit, output=cfg.output,
                       decision=cfg.decision)
    rounds, pseudo, left = None, None, cfg.time_limit - (time.monotonic() - start) if cfg.time_limit else 0.0
    if cfg.pseudo_label and (tests is None or left < 0):
        logger.warning("warning: --pseudo-label: " + ("no test split to pseudo-label" if tests is None else
                       "the time limit is spent") + "; blending round one only")
    elif cfg.pseudo_label:
        second = pseudo_round(done, caches, tests, cfg.out, folds=cfg.folds, confidence=cfg.pseudo_confidence,
                              time_limit=left, output=cfg.output, decision=cfg.decision)
        rounds = {"round one": [m.name for m in done], "round two": [m.name for m in second]}
        pseudo = {"confidence": cfg.pseudo_confidence, "members": {
            m.name: RunDir(cfg.out / "members" / m.name).read_json("pseudo.json") for m in second}}
        done = [*done, *second]
    info = blend(done, caches, cfg.out, mode=cfg.decision, seed=0, rounds=rounds, pseudo=pseudo)
    _say(f"blend of {len(done)} members: cross-fitted samples-F1 {info['blend_samples_f1']:.4f}, best member "
         f"{max(info['member_samples_f1'].values()):.4f}; "
         + ("blended" if info["blended"] else "the best member alone scored at least as well: kept alone"))
    if info.get("rounds"):
        _say("pseudo-labels: " + ", ".join(f"{k} blend {v:.4f}" for k, v in info["rounds"].items())
             + " (cross-fitted samples-F1)")
    return info
