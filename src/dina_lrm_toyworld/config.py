"""The toy world's settings, each declared once with its help: the preference data, the toy generator and
its pretraining, the demo, the ablation table and the alignment experiment. Torch-free, so the
commands' flags are generated from these classes and ``dina-lrm --help`` stays instant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dina_lrm import DTYPE_NAMES, setting

U_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

ENSEMBLE = (0.2, 0.5, 0.7)  # the paper's test-time levels


@dataclass(frozen=True)
class Variant:
    """What one row trains and how it scores; the defaults are the full DiNa-LRM."""

    reward: str = "dina"  # dina | lrm (LPO's pooled-feature cosine head) | pixel (decodes; a CNN reads the image)
    loss: str = "thurstone"  # thurstone (noise-calibrated variance) | thurstone_const | bt
    train_u: str = "uniform"  # uniform: u ~ U(0, 1) | zero: clean latents only
    backbone: str = "lora"  # lora | frozen (head only) | full (every backbone weight trains)
    test_levels: tuple[float, ...] = ()  # (): each u of the grid alone; else one ensemble of these levels

    @property
    def training(self) -> Variant:
        """The model this row scores with: rows that differ only at test time share it."""
        return dataclasses.replace(self, test_levels=())

    def differences(self, other: Variant) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class Row:
    name: str
    variant: Variant
    reference: str | None  # the row it differs from in exactly one setting


ROWS = (
    Row("DiNa-LRM (full)", Variant(), None),
    Row("constant variance", Variant(loss="thurstone_const"), "DiNa-LRM (full)"),
    Row("Bradley-Terry", Variant(loss="bt"), "DiNa-LRM (full)"),
    Row("clean only (u = 0)", Variant(train_u="zero"), "DiNa-LRM (full)"),
    Row("frozen backbone (head only)", Variant(backbone="frozen"), "DiNa-LRM (full)"),
    Row("full fine-tune", Variant(backbone="full"), "DiNa-LRM (full)"),
    Row("ensemble {0.2,0.5,0.7}, calibrated", Variant(test_levels=ENSEMBLE), "DiNa-LRM (full)"),
    Row("ensemble {0.2,0.5,0.7}, constant variance", Variant(loss="thurstone_const", test_levels=ENSEMBLE),
        "ensemble {0.2,0.5,0.7}, calibrated"),
    Row("LRM-style (LPO: pooled cosine, BT)", Variant(reward="lrm", loss="bt"), "Bradley-Terry"),
    Row("pixel reward (decodes), equal FLOPs", Variant(reward="pixel", loss="bt"), "Bradley-Terry"),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


RUNS = {  # name: (method, reward); "renders": fine-tuning on ground-truth renders, judged by the judge
    "SFT on renders": ("sft", "renders"),
    "NFT + constant reward": ("nft", "constant"),
    "NFT + judge": ("nft", "judge"),
    "NFT + DiNa-LRM": ("nft", "dina"),
    "NFT + pixel reward": ("nft", "pixel"),
    "ReFL + DiNa-LRM": ("refl", "dina"),
    "GRPO + judge": ("grpo", "judge"),
}
GATE = ("SFT on renders", "NFT + constant reward")  # run with the first seed only
DEFAULT_RUNS = [name for name in RUNS if name != "GRPO + judge"]


# the biased base's recipe: `dina-lrm toyworld bias` (a continuation of the shipped generator)
BIASED_BASE_RECIPE = dict(seed=7, confusion_rate=0.5, dataset_size=8192, generator_steps=400, generator_lr=2e-4, warmup_steps=20,
                          ema_decay=0.99, train_text_encoders=False, save_dtype="float16")


@dataclass
class PreferenceDataConfig:
    train_prompts: int = setting(450, "prompts of the training split")
    test_prompts: int = setting(60, "prompts of the held-out split")
    samples_per_prompt: int = setting(6, "generator samples per prompt")
    corruptions_per_prompt: int = setting(4, "corrupted renders per prompt")
    flip_rate: float = setting(0.2, "share of training labels the noisy rater flips")
    min_judge_gap: float = setting(0.05, "pairs closer than this in judge score are ties, left out")
    sampling_steps: int = setting(12, "generator sampling steps")
    guidance_scale: float = setting(4.0, "generator classifier-free guidance")
    batch_size: int = setting(128, "samples per generator batch")
    seed: int = setting(0, "the data's seed (dina-lrm demo: --seed unless given)")


@dataclass
class ToyGeneratorConfig:
    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 4x downsampling
    num_layers: int = 4
    dual_attention_layers: tuple[int, ...] = (0, 1, 2)
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    clip_width: int = 64  # each CLIP; their states are concatenated (2 * clip_width = joint width)
    clip_layers: int = 2
    max_prompt_tokens: int = 16
    shift: float = 1.0

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


@dataclass
class PretrainConfig:
    seed: int = setting(0, "the pretraining seed")
    vae_steps: int = setting(2000, "VAE training steps")
    vae_batch: int = setting(32, "VAE batch size")
    vae_crop: int = setting(32, "VAE training crop side in pixels")
    vae_lr: float = setting(1e-3, "VAE learning rate")
    kl_weight: float = setting(1e-6, "VAE KL weight")
    defect_rate: float = setting(0.3, "share of training renders with a random defect")
    confusion_rate: float = setting(0.0, "share of object groups rendered in their CONFUSIONS colour (the caption unchanged)")
    dataset_size: int = setting(30000, "renders the generator trains on")
    generator_steps: int = setting(9000, "generator training steps")
    generator_batch: int = setting(64, "generator batch size")
    generator_lr: float = setting(1e-3, "generator learning rate")
    warmup_steps: int = setting(200, "generator learning-rate warmup steps")
    cfg_dropout: float = setting(0.1, "share of captions dropped (for classifier-free guidance)")
    ema_decay: float = setting(0.999, "the saved generator's EMA decay")
    train_text_encoders: bool = setting(True, "False: only the transformer learns (the biased base keeps the shipped text encoders)")
    vae_from: str = setting("", "a toy pipeline directory whose trained VAE is reused (stage 1 is skipped)")
    generator_from: str = setting("", "a toy pipeline directory to continue from (its VAE is kept, stage 1 is skipped)")
    save_dtype: str = setting("float32", "float16 halves the files (the shipped early generator)", choices=DTYPE_NAMES)
    generator: ToyGeneratorConfig = field(default_factory=ToyGeneratorConfig)


@dataclass
class DemoConfig:
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    steps: int = setting(300, "optimizer steps of each DiNa-LRM variant; the pixel reward gets the same training FLOPs")
    batch_size: int = setting(32, "pairs per optimizer step")
    learning_rate: float = setting(5e-4, "reward models' learning rate")
    monitor_u: float = setting(0.4, "the noise level of the held-out accuracy tracked during training")
    monitor_pairs: int = setting(128, "held-out pairs of the accuracy tracked during training")
    eval_every: int = setting(50, "steps between evaluations on the monitor pairs")
    ensemble_levels: tuple[float, ...] = setting((0.2, 0.5, 0.7), "the paper's test-time ensemble")
    benchmark_prompts: int = setting(100, "the judge-ranked benchmark `dina-lrm eval` runs on at the end")
    search_prompts: int = setting(32, "held-out prompts of the reward-guided sampling experiment")
    seed: int = setting(0, "the demo's seed (also the data's unless --data.seed is given)")


@dataclass
class AblationConfig:
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    steps: int = setting(300, "optimizer steps of every DiNa-LRM-backbone row; the pixel reward gets the same FLOPs")
    batch_size: int = setting(32, "pairs per optimizer step")
    learning_rate: float = setting(5e-4, "reward models' learning rate")
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], help="training seeds of every row")
    rows: list[str] = setting(factory=lambda: [row.name for row in ROWS], help="a subset of the rows, by name")
    u_grid: tuple[float, ...] = setting(U_GRID, "noise levels scored one by one")
    benchmark_prompts: int = setting(100, "prompts of the judge-ranked benchmark")
    resamples: int = setting(1000, "bootstrap resamples of each interval")
    workers: int = setting(2, "rows trained in parallel processes")

    def validate(self) -> None:
        unknown = [name for name in self.rows if name not in ROW_BY_NAME]
        if unknown:
            raise ValueError(f"unknown ablation rows {unknown}; choose from {list(ROW_BY_NAME)}")
        if self.steps < 1 or not self.seeds:
            raise ValueError("ablations need steps >= 1 and at least one seed")
        for level in (*self.u_grid, *ENSEMBLE):
            if not 0 <= level <= 1:
                raise ValueError(f"noise levels must lie in [0, 1], got {level}")


@dataclass
class ToyAlignmentConfig:
    base: str = setting("biased", "biased (the shipped biased generator), early (the early generator) or a toy pipeline directory")
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], help="seeds of every run")
    runs: list[str] = setting(factory=lambda: list(DEFAULT_RUNS), help="a subset of the runs, by name (default: all but 'GRPO + judge')")
    data: PreferenceDataConfig = field(default_factory=lambda: PreferenceDataConfig(train_prompts=300, test_prompts=40, guidance_scale=1.0))
    reward_steps: int = setting(300, "optimizer steps of DiNa-LRM")
    pixel_reward_steps: int = setting(150, "optimizer steps of the pixel reward (each decodes its pairs: 5x DiNa-LRM's step cost); its accuracy plateaus by then")
    reward_batch_size: int = setting(32, "pairs per reward-model step")
    reward_learning_rate: float = setting(5e-4, "reward models' learning rate")
    train_prompts: int = setting(512, "alignment training prompts")
    renders_per_prompt: int = setting(4, "ground-truth renders of each training prompt, for the SFT gate")
    num_val_prompts: int = setting(32, "validation prompts (they pick the kept checkpoint)")
    num_test_prompts: int = setting(64, "test prompts (never used to pick)")
    eval_sampling_steps: int = setting(12, "sampling steps of the evaluations")
    settings: dict = field(default_factory=dict)  # per method (nft, sft, refl, grpo): AlignConfig keys over SETTINGS
    rewards_from: str = setting("", "an earlier experiment's folder (same base) whose rewards and render shards are reused")
    workers: int = setting(2, "runs in parallel processes of one thread each (the toy models use one core poorly)")
