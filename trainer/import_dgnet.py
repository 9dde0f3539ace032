"""Import the public DG-Net checkpoints (NVlabs/DG-Net) as reidgen checkpoints.

The reference trainer saves ``gen_XXXXXXXX.pt`` = {'a': generator, 'b': the same generator},
``id_XXXXXXXX.pt`` = {'a': appearance encoder}, ``dis_XXXXXXXX.pt`` = {'a': discriminator}, and its
teacher folder holds ``net_last.pth``, a baseline ResNet-50 classifier's state dict. The key names
and shapes are listed in shared/reference/dgnet_reference_checkpoint_layout.json; the networks
they fit are the paper preset in the ``reference`` generator layout (generator_service.models.dgnet_nets),
which computes what the reference generator computes.

Every file is read with ``torch.load(weights_only=True)`` (`read_plain`), so importing runs no code
from it. Each reference key is renamed to its reidgen key by a table built from the target
network: a key the table does not know, a key it expects but the file lacks, or a shape that
differs is refused, naming the first few.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from generator_service.models.dgnet import DGNET_PRESETS, DGNet, DGNetConfig
from generator_service.models.dgnet_nets import reference_init, with_layout
from generator_service.models.reid import ReidModelConfig, ReidNet
from reidgen.core.checkpoint import file_identity, lineage_entry, read_plain, save_checkpoint
from reidgen.core.config import config_to_dict
from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap, scan_split
from trainer.tasks.dgnet import dgnet_preset_config

# Reference keys that carry nothing the computation uses: torchvision's ImageNet classifier (`fc`,
# replaced by the ClassBlock heads) and the AdaIN layers' dummy running statistics.
_IGNORED = re.compile(r"^(model\.fc\.(weight|bias)|dec\.model\.1\.model\.\d+\.model\.\d+\.norm\.running_(mean|var))$")


# --------------------------------------------------------------------------------------------
# Name tables: reidgen key -> reference key, built from the reidgen module's own keys
# --------------------------------------------------------------------------------------------


def _head_name(key: str, theirs: str) -> str | None:
    """A ClassifierHead key (embed, bn, classifier) -> the reference ClassBlock key."""
    part, _, leaf = key.partition(".")
    return {"embed": f"{theirs}.add_block.0.{leaf}", "bn": f"{theirs}.add_block.1.{leaf}",
            "classifier": f"{theirs}.classifier.0.{leaf}"}.get(part)


def appearance_names(ea: nn.Module) -> dict[str, str]:
    """E_a (AppearanceEncoder) keys -> ft_netAB keys (the 'a' entry of id_XXXXXXXX.pt)."""
    names = {}
    for key in ea.state_dict():
        if key.startswith("backbone."):
            names[key] = "model." + key.removeprefix("backbone.")
        elif key.startswith("head_prim."):
            names[key] = _head_name(key.removeprefix("head_prim."), "classifier1")
        elif key.startswith("head_fine."):
            names[key] = _head_name(key.removeprefix("head_fine."), "classifier2")
    return names


def reid_names(net: nn.Module) -> dict[str, str]:
    """ReidNet keys -> the reference baseline ft_net keys (net_last.pth)."""
    names = {}
    for key in net.state_dict():
        if key.startswith("backbone."):
            names[key] = "model." + key.removeprefix("backbone.")
        elif key.startswith("head."):
            names[key] = _head_name(key.removeprefix("head."), "classifier")
    return names


def generator_names(net: DGNet) -> dict[str, str]:
    """E_s and G keys (``es.*``, ``dec.*``) -> AdaINGen keys (gen_XXXXXXXX.pt['a'])."""
    cfg = net.cfg.generator
    if len(cfg.aspp_dilations) != 3 or cfg.dec_out_convs != 2:
        raise ReidgenError("only the paper's generator (3 ASPP dilations, 2 output convs) has reference checkpoints")
    n = cfg.dec_res_blocks
    table: list[tuple[str, str]] = []
    for i in range(4):
        table.append((rf"es\.stem\.{i}\.0\.", f"enc_content.model.{i}.conv."))
    for i in range(cfg.es_res_blocks):
        for ours, theirs in ((0, 0), (3, 1)):
            table.append((rf"es\.res\.{i}\.body\.{ours}\.", f"enc_content.model.4.model.{i}.model.{theirs}.conv."))
    table.append((r"es\.aspp\.branches\.0\.0\.", "enc_content.model.5.conv1.conv."))
    for j, name in enumerate(("conv6", "conv12", "conv18"), start=1):
        for layer in (0, 1):
            table.append((rf"es\.aspp\.branches\.{j}\.{layer}\.0\.", f"enc_content.model.5.{name}.{layer}.conv."))
    table.append((r"es\.aspp\.fuse\.0\.", "enc_content.model.5.fuse.conv."))
    for i in range(n):
        for j in (1, 2):
            table.append((rf"dec\.res_blocks\.{i}\.conv{j}\.", f"dec.model.1.model.{i}.model.{j - 1}.conv."))
    for ours, theirs in ((1, 3), (5, 5)):  # upsample stages: [Upsample, conv, LayerNorm, lrelu] x 2
        table.append((rf"dec\.upsample\.{ours}\.", f"dec.model.{theirs}.conv."))
        table.append((rf"dec\.upsample\.{ours + 1}\.weight$", f"dec.model.{theirs}.norm.gamma"))
        table.append((rf"dec\.upsample\.{ours + 1}\.bias$", f"dec.model.{theirs}.norm.beta"))
    for ours, theirs in ((0, 6), (2, 7), (4, 8)):
        table.append((rf"dec\.head\.{ours}\.", f"dec.model.{theirs}.conv."))
    for m in range(2 * n):  # per_block grouping: scales then biases
        mlp = f"mlp_w{m + 1}" if m < n else f"mlp_b{m - n + 1}"
        for ours, theirs in ((0, 0), (2, 1), (4, 2)):
            table.append((rf"dec\.mlps\.{m}\.{ours}\.", f"{mlp}.model.{theirs}.fc."))
    return _apply_table(table, [k for k in net.state_dict() if k.startswith(("es.", "dec."))])


def discriminator_names(net: DGNet) -> dict[str, str]:
    """D keys (``dis.*``) -> MsImageDis keys (dis_XXXXXXXX.pt['a'])."""
    cfg = net.cfg.generator
    table: list[tuple[str, str]] = []
    for s in range(cfg.dis_scales):
        for i, ours in enumerate((0, 2, 4, 6, 8)):
            table.append((rf"dis\.scales\.{s}\.net\.{ours}\.", f"cnns.{s}.{i}.conv."))
        for r in range(cfg.dis_res_blocks):
            for ours, theirs in ((0, 0), (3, 1)):
                table.append((rf"dis\.scales\.{s}\.net\.{10 + r}\.body\.{ours}\.",
                              f"cnns.{s}.{5 + r}.model.{theirs}.conv."))
        last = 10 + cfg.dis_res_blocks
        table.append((rf"dis\.scales\.{s}\.net\.{last}\.", f"cnns.{s}.{5 + cfg.dis_res_blocks}."))
    return _apply_table(table, [k for k in net.state_dict() if k.startswith("dis.")])


def _apply_table(table: list[tuple[str, str]], keys: list[str]) -> dict[str, str]:
    names = {}
    for key in keys:
        for pattern, theirs in table:
            m = re.match(pattern, key)
            if m:
                names[key] = theirs + key[m.end():]
                break
        else:  # a reidgen key the table misses: a bug here, not in the user's file
            raise AssertionError(f"no reference name for {key}")
    return names


# --------------------------------------------------------------------------------------------
# Reading and translating one file
# --------------------------------------------------------------------------------------------


def read_reference_state(path: str | Path, what: str, entry: str | None = "a") -> dict[str, torch.Tensor]:
    """The state dict in a reference file, read as plain data. ``entry`` is the key the reference
    trainer wraps it in ('a'); a bare state dict is accepted too."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReidgenError(f"{what} {path} not found")
    data = read_plain(path, what)
    if isinstance(data, dict) and entry is not None and entry in data and isinstance(data[entry], dict):
        data = data[entry]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        shape = f"a dict with keys {sorted(map(str, data))[:4]}" if isinstance(data, dict) else type(data).__name__
        raise ReidgenError(f"{what} {path} holds {shape}; expected a state dict of tensors"
                           + (f" (or {{'{entry}': state dict}}, as the DG-Net trainer saves it)" if entry else ""))
    return dict(data)


def translate(source: dict[str, torch.Tensor], names: dict[str, str], target: dict[str, torch.Tensor],
              what: str, ignored: re.Pattern = _IGNORED) -> dict[str, torch.Tensor]:
    """Rename ``source`` (reference keys) to reidgen keys; refuse unknown, missing or misshapen keys."""
    wanted = {theirs: ours for ours, theirs in names.items()}
    unknown = [k for k in source if k not in wanted and not ignored.match(k)]
    missing = [theirs for theirs in wanted if theirs not in source]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unknown:
            more = ", ..." if len(unknown) > 4 else ""
            parts.append(f"{len(unknown)} unexpected keys ({', '.join(unknown[:4])}{more})")
        raise ReidgenError(f"{what} is not in the DG-Net reference layout: {'; '.join(parts)}")
    out, wrong = {}, []
    for theirs, ours in wanted.items():
        value = source[theirs]
        if tuple(value.shape) != tuple(target[ours].shape):
            wrong.append(f"{theirs} is {list(value.shape)}, expected {list(target[ours].shape)}")
        out[ours] = value.to(target[ours].dtype)
    if wrong:
        raise ReidgenError(f"{what} does not fit the reference network: {len(wrong)} tensors of another shape "
                           f"({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
    return out


def _require_classes(source: dict[str, torch.Tensor], key: str, label_map: LabelMap, what: str, data) -> None:
    weight = source.get(key)
    if weight is not None and weight.dim() == 2 and weight.shape[0] != len(label_map):
        raise ReidgenError(f"{what} has {weight.shape[0]} classes ({key} is {list(weight.shape)}) but the training "
                           f"split of {data} has {len(label_map)} identities; import it with the data set it was "
                           "trained on (its classes are that set's sorted ids)")


def data_label_map(data: str | Path) -> LabelMap:
    """The label map of a data set's training split: sorted ids, as the reference's ImageFolder sorts them."""
    items = scan_split(data, "train")
    if not items:
        raise ReidgenError(f"the training split of {data} has no images")
    return LabelMap.from_items(items)


# --------------------------------------------------------------------------------------------
# The two imports
# --------------------------------------------------------------------------------------------


def reference_teacher_config(last_stride: int = 2) -> ReidModelConfig:
    """The reference's baseline teacher: ResNet-50, average pooling, 512 bottleneck, dropout 0.5,
    256x128; its last stride is 2 unless its opts.yaml says 1."""
    return ReidModelConfig(backbone="resnet50", last_stride=last_stride, pool="avg", bottleneck=512,
                           dropout=0.5, image_size=(256, 128))


def import_reid(path: str | Path, data: str | Path, out: str | Path, last_stride: int = 2) -> Path:
    """net_last.pth (reference baseline ft_net) -> a reidgen 'reid' checkpoint."""
    label_map = data_label_map(data)
    what = f"teacher file {path}"
    source = read_reference_state(path, "teacher file", entry=None)
    _require_classes(source, "classifier.classifier.0.weight", label_map, what, data)
    config = reference_teacher_config(last_stride)
    with torch.device("meta"):  # names and shapes only: every value comes from the file
        net = ReidNet(config, len(label_map))
    state = translate(source, reid_names(net), net.state_dict(), what)
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    return save_checkpoint(out, "reid", {
        "model_config": config_to_dict(config), "label_map": label_map.to_list(), "model": net.state_dict(),
        "imported_from": {"format": "DG-Net reference baseline (ft_net)", "file": Path(path).name,
                          "sha256_16": file_identity(path)},
    })


def import_dgnet(gen: str | Path, ea: str | Path, data: str | Path, out: str | Path, *,
                 dis: str | Path | None = None, teacher: str | Path | None = None,
                 teacher_last_stride: int = 2, ea_last_stride: int = 1, seed: int = 0) -> Path:
    """gen/id[/dis] files of the reference trainer -> a reidgen 'dgnet' checkpoint (paper preset,
    reference layout). Without ``dis``, D starts from the reference initialisation (serving and
    generation never use it). With ``teacher``, the teacher is imported beside ``out``
    (OUT_STEM.teacher.pt) and recorded as the checkpoint's teacher, which batch jobs use for soft labels.
    ``ea_last_stride`` is the model's ``ID_stride`` (config.yaml; 1 in configs/latest.yaml): the files
    have the same shapes either way, so it cannot be read from them."""
    data = Path(data)
    out = Path(out)
    label_map = data_label_map(data)
    paper: DGNetConfig = DGNET_PRESETS["paper"]
    cfg = replace(paper, last_stride=ea_last_stride, generator=with_layout(paper.generator, "reference"))
    with torch.device("meta"):  # names and shapes only, until every file has been checked
        net = DGNet(cfg, len(label_map))
    target = net.state_dict()

    state = translate(read_reference_state(gen, "generator file"), generator_names(net), target,
                      f"generator file {gen}")
    ea_state = read_reference_state(ea, "appearance encoder file")
    _require_classes(ea_state, "classifier1.classifier.0.weight", label_map, f"appearance encoder file {ea}", data)
    _require_classes(ea_state, "classifier2.classifier.0.weight", label_map, f"appearance encoder file {ea}", data)
    ea_names = {f"ea.{k}": v for k, v in appearance_names(net.ea).items()}
    state.update(translate(ea_state, ea_names, target, f"appearance encoder file {ea}"))
    sources = {"gen": Path(gen).name, "id": Path(ea).name, "gen_sha256_16": file_identity(gen),
               "id_sha256_16": file_identity(ea)}
    if dis is not None:
        dis_state = read_reference_state(dis, "discriminator file")
        state.update(translate(dis_state, discriminator_names(net), target, f"discriminator file {dis}"))
        sources.update(dis=Path(dis).name, dis_sha256_16=file_identity(dis))
    net = net.to_empty(device="cpu")
    if dis is None:  # D starts where train-dgnet starts it
        torch.manual_seed(seed)
        reference_init([], net.dis)
        state.update({k: v for k, v in net.state_dict().items() if k.startswith("dis.")})
        sources["dis"] = None
    net.load_state_dict(state, strict=True)

    teacher_out = ""
    if teacher is not None:
        teacher_path = out.with_name(out.stem + ".teacher.pt")
        import_reid(teacher, data, teacher_path, teacher_last_stride)
        teacher_out = str(teacher_path.resolve())
        sources["teacher"] = Path(teacher).name
    train_cfg = dgnet_preset_config("paper", data=str(data.resolve()), teacher=teacher_out)
    train_cfg = replace(train_cfg, model=cfg)
    return save_checkpoint(out, "dgnet", {
        "model_config": config_to_dict(cfg), "train_config": config_to_dict(train_cfg),
        "label_map": label_map.to_list(), "model": net.state_dict(),
        # No optimiser state: a run started from this file starts its optimisers afresh.
        "optimizers": [], "step": 0, "rng": [],
        "imported_from": {"format": "DG-Net reference (NVlabs/DG-Net trainer save)", **sources},
        **({"lineage": {"teacher": lineage_entry(teacher_out)}} if teacher_out else {}),
    })
