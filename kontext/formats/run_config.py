"""A run's `config.yaml`, read without trusting it: it must be stored resolved (no interpolation,
which could call a resolver) and builds only the project's own classes (`BUILDS`), so reading
someone else's run never runs their code. Runs recorded before the package's subpackages name
those classes by their former paths (`FORMER_TARGETS`), which still read."""

from __future__ import annotations

from pathlib import Path

from kontext.errors import KontextError, first_line

# What each section of a run's config may build (`_target_`, at any depth).
BUILDS = {
    "model": {"kontext.network.model.FluxParams"},
    "autoencoder": {"kontext.latent.autoencoder.AutoEncoderParams", "kontext.latent.autoencoder.load_autoencoder"},
    "text": {"kontext.latent.text.build_text_encoder"},
}
# The same, as runs recorded them before the package was split into subpackages.
FORMER_TARGETS = {"kontext.model.FluxParams": "kontext.network.model.FluxParams",
                  "kontext.autoencoder.AutoEncoderParams": "kontext.latent.autoencoder.AutoEncoderParams",
                  "kontext.autoencoder.load_autoencoder": "kontext.latent.autoencoder.load_autoencoder",
                  "kontext.text.build_text_encoder": "kontext.latent.text.build_text_encoder"}


def read_run_config(path: Path):
    """A run's `config.yaml` as stored (resolved), refusing interpolations and Python tags."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise KontextError(f"run config not found: {path}")
    try:
        cfg = OmegaConf.load(path)
        text = OmegaConf.to_yaml(cfg)  # raw: nothing is resolved
    except Exception as err:  # yaml and omegaconf raise many types
        raise KontextError(f"cannot read run config {path}: {first_line(err)}") from err
    if "${" in text:  # a run stores its config resolved; an interpolation could call a resolver
        line = next(line.strip() for line in text.splitlines() if "${" in line)
        raise KontextError(f"run config {path} holds an interpolation ({line[:80]}); a run's config is stored resolved")
    return cfg


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _renamed(node):
    """`node` with the `_target_`s of FORMER_TARGETS under their current names."""
    if isinstance(node, dict):
        return {k: FORMER_TARGETS.get(v, v) if k == "_target_" else _renamed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v) for v in node]
    return node


def build_from_run_config(section, what: str, where: Path):
    """Instantiate the `what` section of the run config `where`, if it builds only `BUILDS[what]`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if section is None:
        raise KontextError(f"{where} has no '{what}' section")
    if not isinstance(section, DictConfig):
        raise KontextError(f"the {what} section of {where} is {section!r}, not a mapping")
    section = OmegaConf.create(_renamed(OmegaConf.to_container(section)))
    for target in _targets(OmegaConf.to_container(section)):
        if target not in BUILDS[what]:
            raise KontextError(f"the {what} section of {where} names {target!r}, which is not built from a run's "
                               f"config (allowed: {', '.join(sorted(BUILDS[what]))})")
    try:
        return instantiate(section, _convert_="all")
    except KontextError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, KontextError) else None
        if cause is not None:
            raise cause from err
        raise KontextError(f"cannot build the {what} of {where} "
                           f"({OmegaConf.to_container(section).get('_target_', '?')}): {first_line(err)}") from err
