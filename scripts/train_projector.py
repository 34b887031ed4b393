"""Train the projector of ``llava-dinov2-qwen2.5-0.5b`` (LLaVA stage 1, #20).

The DINOv2 tower and Qwen2.5-0.5B stay frozen; the projector's MLP learns the next-token loss of short answers about
clip-art pictures whose content is known (``vision_pictures.py``): a caption in one of several forms ("This is a
drawing of a bird.", "The picture shows the flag of Angola."), for the four kinds also the kind in one word (options in
a random order) and yes/no questions about one kind ("Is there an animal in this image?"). Pictures: the bundled
``images`` set plus the other renderable pictures of the four kinds (plants also mirrored: only 35 remain for
training) and ``--n-other`` pictures of other folders; never a picture of ``images_test``
(compared by source file and by rendered bytes). DINOv2 features are computed once and cached under ``--out``.
Seeded; writes the weights (float16 safetensors) and a JSON record (data manifest with SHA-256 of every picture,
settings, losses, time) whole, into ``crvlm_core/models/weights/`` with ``--install``.

    python scripts/train_projector.py [--epochs 3] [--install]

What the model then sees: ``benchmarks/bench_vision_model.py`` (the kind of each held-out picture, trained and
untrained projector).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
from PIL import ImageOps
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vision_pictures as vp  # noqa: E402

from crvlm_core.data.bundled import load_dataset  # noqa: E402
from crvlm_core.models.dinov2 import load_dinov2  # noqa: E402
from crvlm_core.models.llava_dinov2 import GRID, PROJECTOR_FILE, build_llava_dinov2  # noqa: E402
from crvlm_core.models.loading import load_model  # noqa: E402

CAPTION_QUESTIONS = ["Describe this image.", "What is shown in this picture?", "What do you see in this image?",
                     "What is this?", "Give a short description of this picture."]
CAPTION_ANSWERS = ["It is {c}.", "This is {c}.", "The picture shows {c}.", "{C}.", "I see {c}."]
KIND_QUESTIONS = ["What kind of thing is shown? Answer in one word: {opts}.",
                  "Which one word describes this picture: {opts}?",
                  "Is this picture of {opts}? Answer with one word.",
                  "One word ({opts}): what is in this image?"]
YES_NO_QUESTIONS = ["Does this picture show {a}? Answer yes or no.", "Is there {a} in this image? Yes or no.",
                    "Is this a picture of {a}? Answer yes or no."]
ARTICLE = {"animal": "an animal", "plant": "a plant", "food": "food", "flag": "a flag"}
KINDS = list(vp.KINDS)
RECIPE = ("2: captions in several answer forms, kinds in one word with the options shuffled, yes/no questions about"
          " one kind; plants also mirrored; each example weighs the same")
MIRRORED = {"plant"}  # kinds with few pictures (35 plants to train on), also seen mirrored


def pictures(n_other: int, seed: int) -> list[dict]:
    """The training pictures (rendered), each ``{source, kind, caption, image, sha256}``, none from images_test;
    pictures of :data:`MIRRORED` kinds come twice, as drawn and mirrored."""
    test = load_dataset("images_test")
    banned_src = {s.extra["image_source"].split(": ", 1)[1] for s in test}
    banned_sha = {hashlib.sha256(s.load_image().tobytes()).hexdigest() for s in test}
    out, seen = [], set(banned_sha)
    for kind in [*KINDS, "other"]:
        paths = vp.shuffled(vp.listing(kind), seed, kind) if kind == "other" else vp.listing(kind)
        paths = [p for p in paths if str(p) not in banned_src]
        kept = itertools.islice(vp.rendered(paths, seen), n_other if kind == "other" else None)
        for rel, image, sha in tqdm(kept, desc=f"render {kind}", leave=False):
            out.append({"source": str(rel), "kind": kind, "caption": vp.caption(kind, rel), "image": image,
                        "sha256": sha})
            if kind in MIRRORED:  # a scarce kind: its mirror image too (a new picture of the same thing)
                mirror = ImageOps.mirror(image)
                out.append({"source": f"{rel} (mirrored)", "kind": kind, "caption": vp.caption(kind, rel),
                            "image": mirror, "sha256": hashlib.sha256(mirror.tobytes()).hexdigest()})
    return out


@torch.no_grad()
def pooled_features(parts, images, batch: int = 16) -> torch.Tensor:
    """DINOv2 features after the projector's fixed part: ``[n, 1 + GRID², 384]``."""
    proc, model = parts.processor, parts.model
    out = []
    for i in tqdm(range(0, len(images), batch), desc="dinov2 features"):
        pixels = proc.image_processor(images[i:i + batch], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        out.append(model.model.multi_modal_projector.pool(hidden))
    return torch.cat(out)


def examples(pics: list[dict], seed: int, epoch: int) -> list[tuple[int, str, str]]:
    """One ``(picture index, question, answer)`` per picture, shuffled. Pictures of the four kinds take turns from epoch
    to epoch between a caption, their kind in one word (the four options in a random order, so the answer cannot come
    from the question's wording) and a yes/no question about one kind (their own half of the time); other pictures
    between a caption and a yes/no question (always no). Captions come in several answer forms."""
    rng = random.Random(f"{seed}:{epoch}")
    rows = []
    for i, p in enumerate(pics):
        kind = p["kind"]
        task = (i + epoch) % 3 if kind != "other" else 2 * ((i + epoch) % 2)
        if task == 1:
            opts = rng.sample(KINDS, len(KINDS))
            question = rng.choice(KIND_QUESTIONS).format(opts=", ".join(opts[:-1]) + " or " + opts[-1])
            rows.append((i, question, kind.capitalize() + "."))
        elif task == 2:
            asked = kind if kind != "other" and rng.random() < 0.5 else rng.choice([k for k in KINDS if k != kind])
            rows.append((i, rng.choice(YES_NO_QUESTIONS).format(a=ARTICLE[asked]), "Yes." if asked == kind else "No."))
        else:
            c = p["caption"]
            answer = rng.choice(CAPTION_ANSWERS).format(c=c, C=c[0].upper() + c[1:])
            rows.append((i, rng.choice(CAPTION_QUESTIONS), answer))
    rng.shuffle(rows)
    return rows


def encode(parts, question: str, answer: str) -> tuple[list[int], list[int], int]:
    """``(prefix ids, rest ids, n_prompt_rest)`` of the chat prompt with image tokens expanded plus the answer and end of
    turn: the prefix is everything before the first image token (the same for every example), ``n_prompt_rest`` the
    prompt's length after it."""
    proc = parts.processor
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text = text.replace(proc.image_token, proc.image_token * (1 + GRID * GRID))
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = ids.index(parts.model.config.image_token_id)
    ans = proc.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids[:cut], ids[cut:] + ans, len(ids) - cut


class PrefixCache:
    """The LM's keys and values of the prompt prefix shared by every example (system turn and the user turn's start),
    computed once without gradients; each batch continues from a fresh cache over them."""

    def __init__(self, parts, prefix: list[int]):
        from transformers import DynamicCache

        self.n = len(prefix)
        with torch.no_grad():
            cache = DynamicCache(config=parts.model.config)
            parts.model.model.language_model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.config = parts.model.config

    def fresh(self, batch: int):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                            for k, v in self.layers], config=self.config)


def batch_loss(parts, feats, rows, projector, prefix: PrefixCache) -> torch.Tensor:
    """Next-token loss on the answers of ``rows`` (the mean over examples of each answer's mean token loss) with image
    positions filled by ``projector.mlp(feats)``; the shared prefix comes from ``prefix``, the rest is right-padded
    (padding sits after every scored token)."""
    model, tok = parts.model, parts.processor.tokenizer
    encoded = [encode(parts, q, a)[1:] for _, q, a in rows]
    width = max(len(seq) for seq, _ in encoded)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), prefix.n + width), dtype=torch.long)
    mask[:, :prefix.n] = 1
    labels = torch.full_like(ids, -100)
    for r, (seq, n_prompt) in enumerate(encoded):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, prefix.n:prefix.n + len(seq)] = 1
        labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    embeds = model.get_input_embeddings()(ids)
    image_rows = projector.mlp(feats[[i for i, _, _ in rows]]).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None],
                                   image_rows.reshape(-1, embeds.shape[-1]))
    positions = torch.arange(prefix.n, prefix.n + width).expand(len(rows), -1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        cache=prefix.fresh(len(rows)), use_cache=True).last_hidden_state
    scored = labels[:, 1:] != -100  # the output layer only where a token is scored (151k columns)
    logits = model.lm_head(hidden[:, :-1][scored])
    token_loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][scored], reduction="none")
    rows_of = torch.arange(len(rows))[:, None].expand_as(scored)[scored]  # each example counts once, short or long
    per_row = torch.zeros(len(rows)).index_add(0, rows_of, token_loss) / scored.sum(1)
    return per_row.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-other", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("outputs/projector"))
    ap.add_argument("--install", action="store_true", help="copy the weights and record into crvlm_core/models/weights")
    ap.add_argument("--max-steps", type=int, default=None, help="stop early (a timing check; nothing installed)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = load_model("qwen2.5-0.5b", device="cpu", dtype=torch.float32)
    tower = load_dinov2()
    if not vp.available():
        raise SystemExit("need Debian packages: apt-get install -y openclipart-svg librsvg2-bin")
    start = time.time()
    parts = build_llava_dinov2(base.hf_model, base.tokenizer, tower, projector=None, seed=args.seed)
    projector = parts.model.model.multi_modal_projector
    pics = pictures(args.n_other, args.seed)
    key = hashlib.sha256("".join(p["sha256"] for p in pics).encode()).hexdigest()[:16]
    cache = args.out / f"features-{key}.pt"
    if cache.exists():
        feats = torch.load(cache)
    else:
        feats = pooled_features(parts, [p["image"] for p in pics])
        torch.save(feats, cache)
    prefix = PrefixCache(parts, encode(parts, CAPTION_QUESTIONS[0], "")[0])
    for p in (projector.linear_1, projector.linear_2):
        p.requires_grad_(True)
    opt = torch.optim.AdamW([*projector.linear_1.parameters(), *projector.linear_2.parameters()], lr=args.lr,
                            weight_decay=0.0)
    steps = args.epochs * ((len(pics) + args.batch - 1) // args.batch)
    print(f"{len(pics)} pictures, {args.epochs} epochs, {steps} steps", file=sys.stderr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    losses = []
    bar = tqdm(total=steps, desc="projector")
    for epoch in range(args.epochs):
        order = examples(pics, args.seed, epoch)
        for i in range(0, len(order), args.batch):
            loss = batch_loss(parts, feats, order[i:i + args.batch], projector, prefix)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 4))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if args.max_steps and len(losses) >= args.max_steps:
                print(f"stopped after {len(losses)} steps, {time.time() - start:.0f} s; losses {losses}",
                      file=sys.stderr)
                return
    bar.close()
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in projector.state_dict().items()}
    weights = args.out / PROJECTOR_FILE.name
    save_file(state, str(weights) + ".tmp")
    Path(str(weights) + ".tmp").replace(weights)
    record = {"recipe": RECIPE, "seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
              "n_other": args.n_other, "n_pictures": len(pics), "n_examples": len(pics) * args.epochs, "seconds": round(time.time() - start, 1),
              "loss_first_20": sum(losses[:20]) / 20, "loss_last_20": sum(losses[-20:]) / 20, "losses": losses,
              "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "held_out": "every picture of the bundled images_test (by source file and rendered bytes)",
              "pictures": [{k: p[k] for k in ("source", "kind", "caption", "sha256")} for p in pics]}
    (args.out / "projector.json").write_text(json.dumps(record, indent=1))
    print(f"trained in {record['seconds']} s; loss {record['loss_first_20']:.3f} -> {record['loss_last_20']:.3f}",
          file=sys.stderr)
    if args.install:
        PROJECTOR_FILE.parent.mkdir(parents=True, exist_ok=True)
        PROJECTOR_FILE.write_bytes(weights.read_bytes())
        PROJECTOR_FILE.with_suffix(".json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
