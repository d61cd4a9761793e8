"""Streaming perplexity of a Hope-ified pretrained LM over long held-out documents, against its own baselines.

Each document is read in pieces of ``piece`` tokens with the attention limited to a sliding ``window``; every token
but the first is scored once, before anything learns from it. Conditions, all from the same Hope-ified model:

* ``cms_on``: the CMS levels learn from the stream as it goes (Eq 71, LM surprise), state carried;
* ``cms_frozen``: the same with test-time updates off (before continual pre-training: the original model exactly);
* ``original``: the ``transformers`` model the Hope-ified one was built from, with the same window (built by
  :func:`original_with_window`: one CMS level per MLP, frozen, which is the pretrained model exactly; it stays the
  reference after continual pre-training changes the Hope-ified model);
* ``dynamic_eval``: the original model plus plain SGD on its MLP weights after each piece is scored (Krause et al.
  2018): the simple test-time-learning baseline.

Documents come from the corpus' test split (never trained on), or from a text file the user passes.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from nested_learning.progress import progress

CONDITIONS = ("original", "cms_frozen", "cms_on", "dynamic_eval")


@dataclasses.dataclass
class PretrainedStreamConfig:
    n_docs: int = 3
    min_tokens: int = 1536
    max_tokens: int = 2048
    piece: int = 256
    windows: tuple = (256,)
    dynamic_lr: float = 3e-2
    conditions: tuple = CONDITIONS
    progress: bool = True


def held_out_documents(tokenizer, n_docs: int, min_tokens: int, max_tokens: int, text_file=None) -> list[list[int]]:
    """Token ids of the first ``n_docs`` test-split documents with at least ``min_tokens`` tokens (cut to
    ``max_tokens``), or of ``text_file`` cut into consecutive documents of ``max_tokens``."""
    if text_file is not None:
        with open(text_file, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        docs = [ids[i : i + max_tokens] for i in range(0, len(ids), max_tokens)]
        docs = [d for d in docs if len(d) >= min(min_tokens, max_tokens)][:n_docs]
        if not docs:
            raise ValueError(f"{text_file} has fewer than {min(min_tokens, max_tokens)} tokens")
        return docs
    from nested_learning.data import load_lm_documents

    docs = []
    for text in load_lm_documents("test"):
        if len(text) < 3 * min_tokens:  # cheap filter before tokenising: English BPE averages ~4 chars a token
            continue
        ids = tokenizer.encode(text)
        if len(ids) >= min_tokens:
            docs.append(ids[:max_tokens])
            if len(docs) == n_docs:
                break
    if not docs:
        raise ValueError(f"no test document has {min_tokens} tokens")
    return docs


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0].float(), targets[0], reduction="sum"))


def stream_nll(model, ids: list[int], piece: int, learn: bool) -> tuple[float, int]:
    """Summed NLL and token count of ``ids`` read in pieces, the state carried, test-time updates ``learn``."""
    x = torch.tensor([ids])
    model.set_test_time_updates(learn)
    total, state = 0.0, None
    with torch.no_grad():
        for a in range(0, x.shape[1] - 1, piece):
            b = min(a + piece, x.shape[1] - 1)
            out = model(x[:, a:b], state=state)
            state = out.state
            total += _nll(out.logits, x[:, a + 1 : b + 1])
    return total, x.shape[1] - 1


def dynamic_eval_nll(model, ids: list[int], piece: int, lr: float) -> tuple[float, int]:
    """Dynamic evaluation: score a piece with the frozen model (state carried), then one SGD step at ``lr`` on the
    CMS levels' slow weights with that piece's mean loss; the next piece reads the new weights."""
    import copy

    m = copy.deepcopy(model)
    m.set_test_time_updates(False)
    params = [p for cms in m.cms_layers() for name, p in cms.named_parameters() if name != "lr_logit"]
    opt = torch.optim.SGD(params, lr=lr)
    x = torch.tensor([ids])
    total, state = 0.0, None
    for a in range(0, x.shape[1] - 1, piece):
        b = min(a + piece, x.shape[1] - 1)
        out = m(x[:, a:b], state=state, labels=x[:, a + 1 : b + 1])
        total += float(out.loss.detach()) * (b - a)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():  # the frozen state holds a snapshot of the levels: refresh it with the new weights
            fresh = [c.initial_state(1, x.device) if c is not None else None for c in
                     (blk.cms for blk in m.blocks)]
            cms = [dataclasses.replace(f, position=s.position) if f is not None else None
                   for f, s in zip(fresh, out.state.cms)]
            state = dataclasses.replace(out.state.detach(), cms=cms)
    return total, x.shape[1] - 1


def original_with_window(hf_model, tokenizer, window: int):
    """The pretrained model as a stream model with a sliding attention window: each MLP a single frozen level."""
    from nested_learning.models.pretrained import hopeify

    model = hopeify(hf_model, tokenizer=tokenizer, chunk_sizes=(1,), scheme="copies", inner_lr=0.0, window=window)
    model.set_test_time_updates(False)
    return model


def with_window(model, window: int):
    """The model with its attention span set to ``window`` (a shallow change of every attention layer)."""
    limit = int(model.hf_config.max_position_embeddings)
    if not 1 <= window <= limit:
        raise ValueError(f"window must lie in [1, {limit}], got {window}")
    for block in model.blocks:
        block.mixer.window = window
    model.window = window
    return model


def run_pretrained_stream(hope, docs: list[list[int]], cfg: PretrainedStreamConfig, original=None) -> dict:
    """Every condition at every window on every document: per-document perplexities and their geometric mean."""
    rows = []
    jobs = [(w, c, d) for w in cfg.windows for c in cfg.conditions for d in range(len(docs))]
    bar = progress(jobs, desc="streaming perplexity", disable=not cfg.progress)
    for window, cond, d in bar:
        bar.set_postfix_str(f"window {window} {cond} doc {d}")
        t0 = time.perf_counter()
        if cond == "original":
            if original is None:
                continue
            nll, n = stream_nll(with_window(original, window), docs[d], cfg.piece, learn=False)
        elif cond == "dynamic_eval":
            if original is None:
                continue
            nll, n = dynamic_eval_nll(with_window(original, window), docs[d], cfg.piece, cfg.dynamic_lr)
        else:
            nll, n = stream_nll(with_window(hope, window), docs[d], cfg.piece, learn=cond == "cms_on")
        rows.append({"window": window, "condition": cond, "doc": d, "nll": nll, "tokens": n,
                     "perplexity": math.exp(nll / n), "seconds": time.perf_counter() - t0})
    return summarise_stream(rows, cfg)


def summarise_stream(rows: list[dict], cfg: PretrainedStreamConfig) -> dict:
    """The stream result from its per-document rows: perplexity per condition and window over all documents."""
    summary = {}
    for window in cfg.windows:
        for cond in cfg.conditions:
            sel = [r for r in rows if r["window"] == window and r["condition"] == cond]
            if sel:
                summary[f"{cond}@{window}"] = math.exp(sum(r["nll"] for r in sel) / sum(r["tokens"] for r in sel))
    return {"config": dataclasses.asdict(cfg), "rows": rows, "perplexity": summary}
