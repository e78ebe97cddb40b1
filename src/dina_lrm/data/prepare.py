"""``dina-lrm prepare``: preference datasets -> normalised VAE latents in parquet shards.

Each work unit of the dataset (see ``readers.py``) becomes one shard ``shard-NNNNN.parquet``, named
by the unit, so a run is deterministic and a crashed run resumes by skipping finished shards.
Under ``accelerate launch`` unit ``i`` goes to rank ``i % world_size`` and each rank writes its own
shards; the main process writes ``index.json`` once all ranks are done.

Per prompt group, every image is resized and centre-cropped into the aspect-ratio bucket nearest
the group's mean aspect ratio, encoded once with the generator's VAE (posterior mean, normalised
as diffusers' SD3 pipelines do), and every pair of images with different human ranks becomes a
row. Prompt embeddings can be cached in the rows so that training does not run the text encoders.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dina_lrm.data.buckets import aspect_ratio_buckets, nearest_bucket, resize_to_bucket
from dina_lrm.data.images import vae_encode, vae_scale_factor
from dina_lrm.data.config import PrepareConfig
from dina_lrm.data.readers import InvalidRow, LabelRules, WorkUnit, dataset_units
from dina_lrm.data.records import ImageSource, PreferenceGroup, ReadReport
from dina_lrm.data.shards import PairRecord, shard_metadata, write_index, write_shard
from dina_lrm.distributed import cpu_only
from dina_lrm.models.backbones import latent_patch_size, prompt_encoder_for
from dina_lrm.outputs import claim_output

logger = logging.getLogger(__name__)


def open_image(source: ImageSource) -> Image.Image:
    """An RGB image from a path or encoded bytes; InvalidRow (the reason) when it cannot be read."""
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source)).convert("RGB")
        if not Path(source).is_file():
            raise InvalidRow("missing image file")
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise InvalidRow("unreadable image") from None


class LatentEncoder:
    """Encodes prompt groups into pair records with one generator's VAE (and text encoders)."""

    def __init__(self, pipe, config: PrepareConfig):
        self.vae = pipe.vae
        self.patch_size = latent_patch_size(pipe.transformer)
        scale = vae_scale_factor(self.vae)
        multiple = scale * self.patch_size
        native = getattr(pipe, "default_sample_size", None)  # in latents; Z-Image's pipeline has none (1024 px)
        reference = config.reference_size or (native * scale if native else 1024)
        self.buckets = aspect_ratio_buckets(reference, multiple, config.bucket_step)
        self.batch_size = config.batch_size
        self.prompt_encoder = None
        if config.cache_prompt_embeds:
            self.prompt_encoder = prompt_encoder_for(pipe.transformer).from_pipeline(pipe, max_sequence_length=config.max_sequence_length)

    @torch.no_grad()
    def encode_groups(self, groups: list[PreferenceGroup], report: ReadReport) -> list[tuple[PreferenceGroup, list[np.ndarray]]]:
        """Each group that has pairs, with one latent per image, all in its aspect-ratio bucket.
        Groups with an unreadable image are dropped, counted in ``report`` and logged."""
        loaded = []
        for group in groups:
            if not group.pairs():
                continue
            try:
                images = [open_image(source) for source in group.images]
            except InvalidRow as err:
                report.drop(group, str(err))
                logger.warning("group %s skipped: %s (%s)", group.group_id, err, group.image_ids)
                continue
            bucket = nearest_bucket([(i.height, i.width) for i in images], self.buckets)
            loaded.append((group, [resize_to_bucket(i, bucket) for i in images]))
        latents = self._encode_all([image for _, images in loaded for image in images])
        encoded, offset = [], 0
        for group, images in loaded:
            encoded.append((group, latents[offset : offset + len(images)]))
            offset += len(images)
        return encoded

    def encode(self, groups: list[PreferenceGroup], report: ReadReport) -> list[PairRecord]:
        encoded = self.encode_groups(groups, report)
        embeds = self._prompt_embeds([group.prompt for group, _ in encoded])
        records = []
        for number, (group, latents) in enumerate(encoded):
            records += self._pairs(group, latents, embeds[number] if embeds else (None, None))
        return records

    def _encode_all(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Latents in input order; images of one size are encoded together in batches."""
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for index in by_size.values():
            for start in range(0, len(index), self.batch_size):
                chunk = index[start : start + self.batch_size]
                pixels = torch.stack([torch.from_numpy(np.asarray(images[i], dtype=np.float32) / 255.0).permute(2, 0, 1) for i in chunk])
                for i, latent in zip(chunk, vae_encode(self.vae, pixels).float().cpu().numpy()):
                    out[i] = latent
        return out

    def _prompt_embeds(self, prompts: list[str]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        if self.prompt_encoder is None or not prompts:
            return None
        states, pooled = self.prompt_encoder(prompts)
        return [(s.float().cpu().numpy(), p.float().cpu().numpy()) for s, p in zip(states, pooled)]

    @staticmethod
    def _pairs(group: PreferenceGroup, latents: list[np.ndarray], embeds) -> list[PairRecord]:
        return [
            PairRecord(
                prompt=group.prompt,
                chosen=latents[a],
                rejected=latents[b],
                pair_id=f"{group.group_id}:{a}-{b}",
                group_id=group.group_id,
                confidence=group.confidence if group.confidence is not None else 1.0,
                source=group.source,
                chosen_id=group.image_ids[a],
                rejected_id=group.image_ids[b],
                prompt_embeds=embeds[0],
                pooled_prompt_embeds=embeds[1],
            )
            for a, b in group.pairs()
        ]


def _finished(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        shard_metadata(path)
        return True
    except ValueError:
        return False


def shard_path(out: Path, unit: WorkUnit) -> Path:
    return out / f"shard-{unit.index:05d}.parquet"


def pending_units(units: list[WorkUnit], out: Path, state: PartialState, finished=_finished) -> list[WorkUnit]:
    """This process's share of ``units`` (unit i goes to rank i % world size) without a finished shard."""
    mine = [u for u in units if u.index % state.num_processes == state.process_index]
    todo = [u for u in mine if not finished(shard_path(out, u))]
    if state.is_main_process:
        print(f"{len(units)} work units; {len(mine) - len(todo)} of this rank's {len(mine)} already done")
    return todo


PREPARE_OUTPUTS = ["shard-*.parquet", "index.json"]


def prepare(config: PrepareConfig, pipe=None, overwrite: bool = False) -> Path | None:
    """Run (or resume) the job on this process's share of units; the main process writes and
    returns the index path (other ranks return None). An ``out`` folder prepared with other
    settings is refused unless ``overwrite`` (which removes its shards first)."""
    from dina_lrm.pipelines import DTYPES, load_pipeline

    config.validate()
    state = PartialState(cpu=cpu_only())
    out = Path(config.out)
    if state.is_main_process:
        claim_output(out, "prepare", _settings(config), PREPARE_OUTPUTS, overwrite=overwrite, continues=True)
    state.wait_for_everyone()
    rules = LabelRules(config.soft_labels, config.min_confidence, config.min_vote_share)
    units = dataset_units(config.format, config.input, config.images_root, config.groups_per_shard, config.split, rules)
    todo = pending_units(units, out, state)
    if todo:
        pipe = pipe if pipe is not None else load_pipeline(config.model, DTYPES[config.dtype]).to(state.device)
        encoder = LatentEncoder(pipe, config)
        for unit in tqdm(todo, desc=f"prepare [rank {state.process_index}]", disable=not state.is_local_main_process):
            groups, report = unit.read()
            write_shard(shard_path(out, unit), encoder.encode(groups, report), report)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    missing = [u.name for u in units if not shard_path(out, u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} work units have no shard (e.g. {missing[:3]}); rerun to finish them")
    return write_index(out, _settings(config))


def _settings(config: PrepareConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "out"}
