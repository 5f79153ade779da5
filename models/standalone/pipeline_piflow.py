# A pi-Flow few-step student as a diffusers pipeline, shipped inside every `piflow export` directory so that
#
#     pipe = diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)
#     image = pipe("a handwritten seven", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
#
# works with diffusers alone (this file imports torch, diffusers and PIL only, never the piflow project).
# pi-Flow (arXiv 2510.14974): the student predicts a Gaussian-mixture policy over velocities at one time; the
# policy's closed-form velocity is integrated (a network-free rollout of many substeps) to the next step's time.
# The math here is the training project's sampler (models/sampling.py, models/policies/gm.py) restated;
# the export tests check both give the same images.
import math
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

COMPONENTS = ("transformer", "policy_head", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")


# ------------------------------------------------------------------------------------- time grid (FlowMapSDE, h = 0)
def warp(tau, shift: float):
    return shift * tau / (1 + (shift - 1) * tau)


def unwarp(sigma, shift: float):
    return sigma / (shift + (1 - shift) * sigma)


def step_grid(nfe: int, final_step_scale: float, shift: float):
    b = 1.0 / (nfe - 1 + final_step_scale)
    k = torch.arange(nfe, dtype=torch.float64)
    taus = torch.cat([(1.0 - k * b).clamp(min=0.0), torch.zeros(1, dtype=torch.float64)])
    return taus, warp(taus, shift)


# ------------------------------------------------------------------------------------------------ GM policy
class GMPolicy:
    """Per pixel a K-component isotropic GM over u at (x_src, sigma_src); velocity(x_t, sigma_t) is the
    posterior-mean velocity under the implied data distribution (precision form, clamped by eps)."""

    def __init__(self, means, logweights, logstd, x_src, sigma_src, eps):
        B = means.shape[0]
        self.eps, self.means, self.x_src = eps, means, x_src
        self.logweights = torch.log_softmax(logweights, dim=1)  # (B, K, 1, H, W)
        self.logstd = logstd.reshape(B, 1, 1, 1, 1)
        self.sigma_src = sigma_src
        self.sigma_src_c = sigma_src.clamp(min=eps).reshape(B, 1, 1, 1, 1)
        self.mu = x_src.unsqueeze(1) - self.sigma_src_c * means  # x0-space component means
        self.var = torch.exp(2 * self.logstd) * self.sigma_src_c ** 2

    def with_temperature(self, T: float) -> "GMPolicy":
        if T >= 1:
            return self
        return GMPolicy(self.means, torch.log_softmax(self.logweights / T, dim=1), self.logstd + 0.5 * math.log(T),
                        self.x_src, self.sigma_src, self.eps)

    def velocity(self, x_t, sigma_t):
        B, eps = x_t.shape[0], self.eps
        sigma_t = sigma_t.to(self.means.dtype).reshape(B).clamp(min=eps).reshape(B, 1, 1, 1)
        sigma_s = self.sigma_src_c.reshape(B, 1, 1, 1)
        alpha_t, alpha_s = 1 - sigma_t, 1 - sigma_s
        zeta = ((alpha_t / sigma_t) ** 2 - (alpha_s / sigma_s) ** 2).reshape(B, 1, 1, 1, 1)
        nu = (alpha_t * x_t / sigma_t ** 2 - alpha_s * self.x_src / sigma_s ** 2).unsqueeze(1)
        denom = (1 + self.var * zeta).clamp(min=eps)
        mu_post = (self.mu + self.var * nu) / denom
        logits = self.logweights + (self.mu * (nu - 0.5 * zeta * self.mu)).sum(dim=2, keepdim=True) / denom
        x0 = (torch.softmax(logits, dim=1) * mu_post).sum(dim=1)
        return (x_t - x0) / sigma_t


def rollout(policy: GMPolicy, x, tau_start: float, tau_end: float, shift: float, total_substeps: float):
    """Euler on the policy's velocity from tau_start to tau_end in max(1, round(span * total)) substeps."""
    B = x.shape[0]
    tau0 = torch.full((B,), tau_start, dtype=torch.float64, device=x.device)
    tau1 = torch.full((B,), tau_end, dtype=torch.float64, device=x.device)
    span = (tau0 - tau1).clamp(min=0)
    n = int(torch.round(span[0] * total_substeps).clamp(min=1))
    h = span / n
    for i in range(n):
        t_from = tau0 - float(i) * h
        t_to = tau1 if i + 1 == n else (tau0 - float(i + 1) * h).clamp(min=0)
        s_from, s_to = warp(t_from, shift), warp(t_to, shift)
        u = policy.velocity(x, s_from).to(x.dtype)
        x = x + u * (s_to - s_from).to(x.dtype).reshape(B, 1, 1, 1)
    return x


# ---------------------------------------------------------------------------------- FLUX token layout (2x2)
def pack_2x2(x):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_2x2(tokens, height: int, width: int):
    B, T, F = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, F // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, F // 4, height, width)


def unpack_channel_last(tokens, height: int, width: int, p: int = 2):
    """DiT's un-patchify: feature (i*p + j) * C + c of the row-major patch tokens."""
    B, T, F = tokens.shape
    x = tokens.reshape(B, height // p, width // p, p, p, F // (p * p)).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, F // (p * p), height, width)


def image_ids(h: int, w: int, device, dtype):
    rows = torch.arange(h, device=device, dtype=dtype).view(-1, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, -1).expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class PiFlowPipeline(DiffusionPipeline):
    """Few-step text-to-image with a pi-Flow GM student (FLUX-architecture families and Qwen-Image). `piflow`
    (model_index.json) holds the family, latent layout, prompt format and the distilled sampler settings."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->policy_head->vae"
    _optional_components = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"]

    def __init__(self, transformer, policy_head, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, vae=None, piflow: Optional[dict] = None):
        super().__init__()
        self.register_modules(transformer=transformer, policy_head=policy_head, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, vae=vae)
        self.register_to_config(piflow=piflow or {})
        self._captured = {}
        # the head reads what the transformer's final layers see: the input of the last projection, and the
        # conditioning embedding (norm_out's second input; DiT: the shared embedding's output)
        if hasattr(transformer, "condition_embedder"):  # Wan: temb is the time embedder's output
            transformer.condition_embedder.time_embedder.register_forward_hook(
                lambda m, args, out: self._captured.__setitem__("temb", out))
            proj = transformer.proj_out
        elif hasattr(transformer, "proj_out_2"):
            transformer.emb.register_forward_hook(lambda m, args, out: self._captured.__setitem__("temb", out))
            proj = transformer.proj_out_2
        else:
            transformer.norm_out.register_forward_pre_hook(lambda m, args: self._captured.__setitem__("temb", args[1]))
            proj = transformer.proj_out
        proj.register_forward_pre_hook(lambda m, args: self._captured.__setitem__("hidden", args[0]))

    # ---- base components that the export references instead of copying
    def _component(self, name: str):
        value = getattr(self, name, None)
        ref = self.config.piflow.get("base_components", {}).get(name)
        if value is None and ref is not None:
            import importlib

            library, cls, root, subfolder = ref
            value = getattr(importlib.import_module(library), cls).from_pretrained(root, subfolder=subfolder)
            if hasattr(value, "eval"):
                value = value.eval().to(self.transformer.device)
            self.register_modules(**{name: value})
        return value

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str]) -> dict:
        """The student's conditioning, as the training project encodes it for this family."""
        cfg = self.config.piflow
        if cfg["family"] == "dit":  # class-conditional: the prompts are class ids written as text
            try:
                return {"class_labels": torch.tensor([int(p.strip()) for p in prompts], dtype=torch.long)}
            except ValueError:
                raise ValueError(f"this ImageNet student takes class ids as prompts (e.g. '207'), got {prompts}")
        if cfg["family"] == "wan":  # UMT5 last hidden states, zero past each prompt's tokens (as WanPipeline)
            import html
            import re

            model, tok = self._component("text_encoder"), self._component("tokenizer")
            clean = [re.sub(r"\s+", " ", html.unescape(html.unescape(p)).strip()).strip() for p in prompts]
            batch = tok(clean, padding="max_length", max_length=cfg["max_sequence_length"], truncation=True,
                        add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            hidden = model(batch.input_ids.to(model.device), batch.attention_mask.to(model.device)).last_hidden_state
            keep = batch.attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
            return {"prompt_embeds": (hidden * keep).float().cpu()}
        if cfg["family"] == "qwen_image":  # Qwen2.5-VL hidden states inside the chat template, prefix dropped
            model, tok = self._component("text_encoder"), self._component("tokenizer")
            drop = cfg["template_drop"]
            batch = tok([cfg["prompt_template"].format(p) for p in prompts], max_length=cfg["tokenizer_max"] + drop,
                        padding=True, truncation=True, return_tensors="pt")
            hidden = model(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(
                model.device), output_hidden_states=True).hidden_states[-1].float().cpu()
            pieces = [h[m.bool()][drop:] for h, m in zip(hidden, batch.attention_mask)]
            T = max(p.shape[0] for p in pieces)
            embeds = hidden.new_zeros(len(pieces), T, hidden.shape[-1])
            mask = torch.zeros(len(pieces), T, dtype=torch.long)
            for i, p in enumerate(pieces):
                embeds[i, : p.shape[0]], mask[i, : p.shape[0]] = p, 1
            L = cfg["max_sequence_length"]
            return {"prompt_embeds": embeds[:, :L], "mask": mask[:, :L]}
        clip, clip_tok = self._component("text_encoder"), self._component("tokenizer")
        t5, t5_tok = self._component("text_encoder_2"), self._component("tokenizer_2")
        ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        ids2 = t5_tok(prompts, padding="max_length", max_length=cfg["max_sequence_length"],
                      truncation=True, return_tensors="pt").input_ids
        seq = t5(ids2.to(t5.device), output_hidden_states=False)[0]
        return {"prompt_embeds": seq.float(), "pooled": pooled.float()}

    def network_inputs(self, x, sigma, cond) -> dict:
        cfg = self.config.piflow
        B, C, H, W = x.shape
        tr = self.transformer
        dtype, device = tr.dtype, tr.device
        if cfg["family"] == "wan":  # the clip (B, C, T, H, W): frames are folded into the policy's height axis
            T = cfg["latent_frames"]
            return dict(hidden_states=x.reshape(B, C, T, H // T, W).to(device, dtype),
                        timestep=(sigma * cfg["num_timesteps"]).to(device),
                        encoder_hidden_states=cond["prompt_embeds"].to(device, dtype))
        if cfg["family"] == "dit":  # the network patchifies the image itself
            return dict(hidden_states=x.to(device, dtype), timestep=(sigma * cfg["num_timesteps"]).to(device),
                        class_labels=cond["class_labels"].to(device))
        embeds = cond["prompt_embeds"].to(device, dtype)
        inputs = dict(hidden_states=pack_2x2(x).to(device, dtype), encoder_hidden_states=embeds,
                      timestep=(sigma * cfg["num_timesteps"]).to(device, dtype))
        if cfg["family"] == "qwen_image":
            inputs.update(encoder_hidden_states_mask=cond["mask"].to(device), img_shapes=[[(1, H // 2, W // 2)]] * B)
            return inputs
        inputs.update(pooled_projections=cond["pooled"].to(device, dtype),
                      img_ids=image_ids(H // 2, W // 2, device, dtype),
                      txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype))
        if cfg.get("guidance") is not None:
            inputs["guidance"] = torch.full((B,), cfg["guidance"], device=device, dtype=torch.float32)
        return inputs

    def make_policy(self, x, sigma, cond):
        """One student evaluation at (x (B, C, H, W) float32, sigma (B,)) -> GMPolicy."""
        B, C, H, W = x.shape
        self.transformer(**self.network_inputs(x, sigma, cond), return_dict=False)
        head = self.policy_head
        hdtype = next(head.parameters()).dtype
        hidden, temb = self._captured.pop("hidden"), self._captured.pop("temb")
        means, logweights, logstd = head(hidden.to(head.device, hdtype), temb.to(head.device, hdtype))
        K = means.shape[2]

        unpack = unpack_channel_last if self.config.piflow["family"] in ("dit", "wan") else unpack_2x2

        def untokenize(t):  # (B, T, K, F) -> (B, K, F / 4, H, W)
            return unpack(t.permute(0, 2, 1, 3).reshape(B * K, t.shape[1], t.shape[3]), H, W).view(B, K, -1, H, W)

        return GMPolicy(untokenize(means).float().to(x.device), untokenize(logweights).float().to(x.device),
                        logstd.float().to(x.device), x.float(), sigma.float(), self.config.piflow["eps"])

    def decode(self, vae, x):
        """Policy latents -> images in [-1, 1] (the family's VAE normalisation); Wan: clips (B, 3, F, H, W)."""
        if self.config.piflow["family"] == "wan":
            B, C, TH, W = x.shape
            T = self.config.piflow["latent_frames"]
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
            z = x.reshape(B, C, T, TH // T, W) * std + mean
            return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0].float()
        if self.config.piflow["family"] == "qwen_image":  # per-channel statistics, a video VAE on one frame
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(x)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(x)
            z = (x * std + mean).unsqueeze(2)
            return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0][:, :, 0].float()
        z = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0].float()

    def prepare_latents(self, batch: int, height: int, width: int, generator, latents):
        if latents is not None:
            return latents.float()
        shape = (self.config.piflow["latent_channels"], height, width)
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
            return torch.stack([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((batch, *shape), generator=generator)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = "", negative_prompt: Optional[Union[str, List[str]]] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_images_per_prompt: int = 1, latents: Optional[torch.Tensor] = None,
                 temperature: Union[str, float] = "auto", output_type: str = "pil", return_dict: bool = True):
        """prompt(s) -> images. `negative_prompt` is accepted for API parity and unused: the teacher's guidance
        (FLUX's embedded 3.5, Qwen-Image's CFG 4.0) is distilled into the student, which runs once per step. height/width in pixels (multiples of 2 x the VAE factor);
        num_inference_steps defaults to the distilled NFE; output_type 'pil' | 'np' | 'pt' | 'latent'."""
        cfg = self.config.piflow
        scale = cfg["vae_scale_factor"]
        H = height // scale if height else cfg["latent_size"]  # latent frame size
        W = width // scale if width else (cfg.get("latent_width") or cfg["latent_size"])
        if H % 2 or W % 2:
            raise ValueError(f"height and width must be multiples of {2 * scale}, got {height}x{width}")
        H *= cfg.get("latent_frames", 1)  # video: the frames are folded into the height axis
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        B = len(prompts)
        cond = self.encode_prompt(prompts)
        x = self.prepare_latents(B, H, W, generator, latents).to(self.transformer.device)
        nfe = num_inference_steps or cfg["nfe"]
        T = min(max(0.1 * (nfe - 1), 0.0), 1.0) if temperature == "auto" else float(temperature)
        taus, sigmas = step_grid(nfe, cfg["final_step_scale"], cfg["shift"])
        for k in range(nfe):
            sigma_k, sigma_to = float(sigmas[k]), float(sigmas[k + 1])
            policy = self.make_policy(x, torch.full((B,), sigma_k, dtype=x.dtype, device=x.device), cond)
            if k < nfe - 1 and T < 1:
                policy = policy.with_temperature(T)
            s_to = torch.as_tensor(sigma_to, dtype=torch.float64)
            tau_dst = unwarp(s_to / ((1 - s_to) + s_to), cfg["shift"])  # h = 0: land on sigma_{k+1}
            x = rollout(policy, x, float(taus[k]), float(tau_dst), cfg["shift"], cfg["total_substeps"])
        if output_type == "latent":
            images = x
        else:
            vae = self._component("vae")
            if vae is None and cfg["family"] != "digits":
                raise ValueError("this export has no VAE (a tiny base): use output_type='latent'")
            if vae is None:  # the latents are the images (the digits family)
                images = (x.clamp(-1, 1) + 1) / 2
            else:
                images = (self.decode(vae, x).clamp(-1, 1) + 1) / 2
            if images.dim() == 5:  # clips: a list of frames per sample
                frames = images.permute(0, 2, 3, 4, 1)
                if output_type == "np":
                    images = frames.cpu().numpy()
                elif output_type == "pil":
                    from PIL import Image

                    arrays = (frames * 255).round().to(torch.uint8).cpu().numpy()
                    images = [[Image.fromarray(f) for f in clip] for clip in arrays]
            elif output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                from PIL import Image

                arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
                images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
