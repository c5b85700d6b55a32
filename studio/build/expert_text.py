"""`gate_mode: expert_text`: routers fitted on text written by the experts themselves.

A handful of natural prompts per expert ("What is 15 + 27?", "Once upon a time...") is too little to fit a
router on: held-out text is made of other tokens than the prompts' few. So each expert continues each of its
prompts a few times, and the thousands of tokens it writes become the calibration text of its domain, with no
data from the user. Sampling does not stop at an end-of-text token: after one, the expert starts a new text.
The experts continue the prompts as plain text (BOS + prompt) whatever the config's `prompt_format`: inside a chat
template every expert writes an assistant's reply, whatever it was fine-tuned on (measured on the zoo with
chat-format prompts: the stories expert kept 4% of its gain with text written in the template, 57% with plain
continuations). The prompts themselves are fitted in the config's format.

Each token is drawn with contrast against the base (logits + CONTRAST * (expert - base), among the tokens the
expert itself finds plausible), so an expert writes more of what it knows better than the base. A continuation
can still drift into another domain (a math expert, after "What is 15 + 27?", may go on with the chat it also
learnt): its advantage over the base (the mean log-probability ratio of its tokens) is then far below the
expert's median, and it is dropped (`typical_pieces`). So is a continuation that surprises the expert itself (a
stories expert lost after a request it never learnt to answer writes garbled code, far less likely to itself than
its stories). An expert may bring its own text instead
(`calibration_text:` files in its config entry).

The advantage over the base does not catch every such drift: the math expert learnt chat better than the base too,
and some of the chats it writes stay within the typical advantage. What tells them apart is the other experts: on
its arithmetic the math expert is far ahead of every other expert, on its chat the chat expert is as good or better.
So once every text is written, each expert reads the others' texts too, and a written text is kept only where its
writer leads the best other expert by at least SPECIFIC of its median lead (`specific_pieces`; measured on the zoo:
chat keeps 2 to 7 points more of its gain in every config with a chat expert, math up to 5 more).

A prompt can also lead an expert astray altogether: the zoo's math expert never learnt the bare keywords of
Beyonder-style configs ("math", "arithmetic", "calculate"), and after them writes garbled code, most of which the
rules above keep (it is typical of what it writes there, and the median lead is that of the garbled code). Such text
is not the writer's own: another expert (code's) gains on it nearly as much as the writer does. So each expert also
writes a few texts from a document's start alone, where it writes what it was fine-tuned on; when fewer than a
quarter of the continuations of its prompts are its own (`kept_texts`), the texts that are take their place (measured
on the zoo's keyword config: math keeps 92% of its gain instead of 18%, code 91% instead of 41%). Those texts may be
far ahead of the base where the continuations are not, so they are also judged typical among themselves
(`typical_of_each`; with one role sentence per expert, as the Maixtchup guide writes them, stories keeps 89% of its
gain instead of 75%, math 94% instead of 91%).

A writer also reads its own samples better than the others do, whatever their domain, so a lead can be its own
bias. From a document's start the zoo's chat expert writes stories as often as chats, and after "The dragon opened
one eye and saw the knight at the door." the stories expert writes chats, with its own slips ("The capital of
Brazil is Lisbon."): each leads the expert of that domain on them. So a text is kept only where it also reads like
the writer's kept text (`read_alike`: its token counts are likest to those of the writer's text, not to any other
expert's), continuations and texts from a document's start alike. Measured on the zoo, six configs and two seeds:
chat keeps 3 to 4 points more of its gain on average, and its held-out prompts reach it more often; stories moves
both ways (-6 to +6 points), under 1 point up on average. (The stories expert's stories, which read like its
continuations, give it clean stories to calibrate on where its continuations of requests and questions are often not
its own; all kept, the chat expert's stories cost stories 20 to 30 points in two configs of seven.) The rule holds
for an expert its prompts led astray too: of the texts the zoo's math expert kept after "math" in `keywords`, one was
a story it wrote from a document's start, which taught the routers to send story tokens to it.

While each expert is in memory, what it predicts on its text is kept too, and how far the base is from it at each
position (studio/build/refine.py's lessons). Then, layer by layer through the merged model (studio/build/calibrate.py),
each router is fitted where it will look, every token of an expert's text labelled with that expert and weighed by
what the expert gains over the base there (`refine.position_weights`), and keeps the fit's own probabilities: sure
where the experts' texts are told apart, hesitant (two experts mixed) where they are not. With the same lessons, the
written routers are then refined end to end (studio/build/refine.py).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from contextlib import contextmanager
from typing import Callable

import torch

from studio.build.refine import Lesson, lessons, padded
from studio.config import Expert
from studio.devices import check_device, resolve_device
from studio.errors import StudioError
from studio.sources import ModelSource
from studio.text_sources import read_text

TOKENS_PER_EXPERT = 6144  # calibration tokens written (or read) per expert
NEW_TOKENS = 192  # written after each prompt
TEMPERATURE = 1.0
CONTRAST = 1.0  # 0 samples from the expert alone (among the tokens PLAUSIBLE keeps)
PLAUSIBLE = 0.1  # tokens less likely than this share of the expert's best token are never drawn
L2 = 1e-2  # the router fit's penalty, on unit-RMS inputs
WINDOW = 256  # tokens per piece of a given calibration text
TYPICAL = 3.0  # a written text is kept when its advantage over the base is within this factor of the median
SPECIFIC = 0.5  # ... and its writer's lead over the other experts is at least this share of the median lead
FREE_TEXTS = 24  # texts each expert also writes from a document's start alone (`kept_texts`, `read_alike`: which serve)
OWN = 0.5  # a text is its writer's own when at least this share of what the writer gains there, no other expert gains
STRAY = 0.25  # an expert's prompts led it astray when fewer than this share of their continuations are its own
SMALL_MODEL = 50_000_000  # parameters


def text_key(expert: int, piece: int) -> tuple[str, int, int]:
    """The key of one piece of calibration text in the fit's batches (prompts are keyed by their text)."""
    return ("text", expert, piece)


def read_calibration_text(expert: Expert, index: int, encode_text: Callable[[str], list[int]], bos: list[int],
                          budget: int = TOKENS_PER_EXPERT) -> list[list[int]]:
    """An expert's `calibration_text` (files, local or of Hub datasets: studio/text_sources.py) as pieces of
    WINDOW tokens, each after BOS, up to `budget` tokens."""
    ids: list[int] = []
    for name in expert.calibration_text or []:
        try:
            text = read_text(name)
        except StudioError as exc:
            raise StudioError(f"`experts[{index}].calibration_text` ({expert.source_model}): {exc}.") from None
        ids += encode_text(text)
        if len(ids) >= budget:
            break
    if len(ids) < WINDOW // 4:
        raise StudioError(f"`experts[{index}].calibration_text` ({expert.source_model}) holds {len(ids)} tokens; "
                          f"give at least {WINDOW // 4} (a few thousand fit the router best).")
    ids = ids[:budget]
    return [bos + ids[start:start + WINDOW] for start in range(0, len(ids), WINDOW)]


def load_writer(source: ModelSource, device: str, trust_remote_code: bool = False):
    """A model that writes calibration text: bf16 on a GPU, float32 on the CPU unless that would not fit."""
    from transformers import AutoModelForCausalLM

    check_device(device)
    device = resolve_device(device)
    parameters = sum(i.nbytes // i.dtype.itemsize for i in source.tensors.values())
    dtype = torch.bfloat16 if device != "cpu" or parameters > 500_000_000 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 device_map=device)
    return model.eval()


@torch.inference_mode()
def write_text(expert, base, prompts: list[list[int]], samples: int, new_tokens: int = NEW_TOKENS,
               seed: int = 0, check: Callable[[], None] = lambda: None
               ) -> tuple[list[list[int]], list[float], list[float]]:
    """`samples` continuations of each prompt by `expert`, contrasted with `base`; each one's advantage: the mean
    log-probability the expert gives its written tokens, minus the base's; and each one's surprise: the mean
    negative log-probability the expert gives its own written tokens."""
    with _threads_for(expert):
        return _write(expert, base, prompts, samples, new_tokens, seed, check)


@contextmanager
def _threads_for(model):
    """One CPU thread for a small model: its token-by-token steps are too small to share, and on a busy 2-core
    host two threads made the zoo's writing 20x slower than one."""
    previous = torch.get_num_threads()
    small = model.device.type == "cpu" and model.num_parameters() < SMALL_MODEL
    torch.set_num_threads(1 if small else previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write(expert, base, prompts, samples, new_tokens, seed, check
           ) -> tuple[list[list[int]], list[float], list[float]]:
    """Every continuation of every prompt in one left-padded batch: on a small model a step costs little more for
    36 rows than for 6, so the zoo writes twice as fast as prompt by prompt."""
    generator = torch.Generator().manual_seed(seed)
    device = expert.get_input_embeddings().weight.device
    rows = [prompt for prompt in prompts for _ in range(samples)]
    if not rows:
        return [], [], []
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    step, positions, caches = ids, (mask.cumsum(-1) - 1).clamp_min(0), [None, None]
    advantage, surprise, new = torch.zeros(len(rows)), torch.zeros(len(rows)), []
    for _ in range(new_tokens):
        check()
        expert_logp = _next_logits(expert, step, mask, positions, caches, 0)
        base_logp = _next_logits(base, step, mask, positions, caches, 1)
        logits = expert_logp + CONTRAST * (expert_logp - base_logp)
        too_unlikely = expert_logp < expert_logp.max(dim=-1, keepdim=True).values + math.log(PLAUSIBLE)
        logits = logits.masked_fill(too_unlikely, float("-inf"))
        probabilities = (logits / TEMPERATURE).softmax(dim=-1).cpu()
        step = torch.multinomial(probabilities, 1, generator=generator).to(device)
        surprise -= expert_logp.gather(1, step).squeeze(1).cpu()
        advantage += (expert_logp - base_logp).gather(1, step).squeeze(1).cpu()
        new.append(step)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        positions = positions[:, -1:] + 1
    written = torch.cat(new, dim=1).tolist()
    return ([row + more for row, more in zip(rows, written)], (advantage / new_tokens).tolist(),
            (surprise / new_tokens).tolist())


def _next_logits(model, step: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, caches: list,
                 slot: int) -> torch.Tensor:
    out = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=caches[slot],
                use_cache=True)
    caches[slot] = out.past_key_values
    return out.logits[:, -1].float().log_softmax(dim=-1)


def typical_pieces(advantages: list[float], surprises: list[float] | None = None) -> list[int]:
    """Indices of the written texts whose advantage lies within a factor TYPICAL of the median, and whose
    surprise is at most TYPICAL times the median.

    Below that advantage, the expert wrote text it knows no better than the base (a math expert going on with the
    chat it also learnt); above, text only it finds likely, which is noise. A surprised expert is lost: after a
    request it never learnt to answer ("Tell me a bedtime story about a brave mouse."), the zoo's stories expert
    writes garbled code, about 6 times as surprising to itself as its stories, though as far ahead of the base.
    Each would teach the router the wrong expert.
    """
    kept = list(range(len(advantages)))
    median = statistics.median(advantages) if advantages else 0.0
    if median > 0:
        kept = [i for i in kept if median / TYPICAL <= advantages[i] <= median * TYPICAL]
    if surprises:
        most = statistics.median(surprises) * TYPICAL
        kept = [i for i in kept if surprises[i] <= most]
    return kept


def typical_of_each(advantages: list[float], surprises: list[float], continuations: int) -> list[int]:
    """`typical_pieces` of all the texts an expert wrote, and those of its texts from a document's start (after the
    first `continuations`) that are typical among themselves. After "You are skilled in mathematics." the zoo's
    math expert writes text barely ahead of the base; against that median its arithmetic from a document's start,
    ten times as far ahead, was dropped as noise, and the routers learnt math from 4 texts. The continuations are
    still judged on the scale of all the texts: the zoo's code expert, after "How do I read a file line by line in
    Python?", writes chat barely ahead of the base and code far ahead, and against the continuations' median alone
    the code was dropped."""
    free = typical_pieces(advantages[continuations:], surprises[continuations:])
    return sorted(set(typical_pieces(advantages, surprises)) | {continuations + i for i in free})


def own_pieces(leads: list[float], gains: list[float]) -> list[int]:
    """Indices of the written texts that are their writer's own: where it gains over the base (mean log-probability
    per token) and leads the best other expert by at least OWN of that gain. On text of another expert's domain
    (the garbled code a math expert writes after a word it never learnt) that expert gains about as much."""
    return [i for i, (lead, gain) in enumerate(zip(leads, gains, strict=True)) if gain > 0 and lead >= OWN * gain]


def kept_texts(leads: list[float], gains: list[float], free: list[bool], continuations: int
               ) -> tuple[list[int], bool]:
    """Indices of an expert's written texts that calibrate its router, and whether its prompts led it astray; given
    how far its writer leads the best other expert on each text and gains over the base, and which texts were
    written from a document's start alone (`free`), after `continuations` of its prompts were written.

    Normally the continuations `specific_pieces` keeps. But when fewer than STRAY of the continuations written are
    the writer's own (`own_pieces`), its prompts led it astray: the zoo's math expert, after the bare keywords
    "math" or "arithmetic" (words it never learnt), writes garbled code, which would teach the router to send code
    to it. Then the texts that are its own are kept, most of them written from a document's start: there an
    expert writes what it was fine-tuned on.
    """
    prompted = [i for i, is_free in enumerate(free) if not is_free]
    by_lead = [prompted[i] for i in specific_pieces([leads[i] for i in prompted])]
    own = own_pieces(leads, gains)
    if not leads or statistics.median(leads) <= 0 or sum(not free[i] for i in own) >= STRAY * continuations:
        return by_lead, False
    return own, True


def read_alike(pieces: list[list[int]], writer: int, references: dict[int, list[list[int]]]) -> list[int]:
    """Indices of the `pieces` whose tokens are likest (cosine of token counts) to those of the writer's
    `references` (per expert, its calibration text so far), rather than to any other expert's: of the texts an expert
    writes from a document's start, those of the domain its prompts point to."""
    centroids = {expert: _centroid(texts) for expert, texts in references.items() if texts}
    if writer not in centroids:
        return []
    bags = [_bag(piece) for piece in pieces]
    return [i for i, bag in enumerate(bags)
            if max(centroids, key=lambda expert: _similarity(bag, centroids[expert])) == writer]


def _bag(piece: list[int]) -> dict[int, float]:
    """A text's token counts (its first token, BOS or the prompt's, left out), scaled to unit length."""
    counts = Counter(piece[1:])
    norm = math.sqrt(sum(count * count for count in counts.values())) or 1.0
    return {token: count / norm for token, count in counts.items()}


def _centroid(pieces: list[list[int]]) -> dict[int, float]:
    total: Counter = Counter()
    for piece in pieces:
        total.update(_bag(piece))
    return {token: weight / len(pieces) for token, weight in total.items()}


def _similarity(bag: dict[int, float], centroid: dict[int, float]) -> float:
    return sum(weight * centroid.get(token, 0.0) for token, weight in bag.items())


def specific_pieces(leads: list[float]) -> list[int]:
    """Indices of the written texts whose writer leads the best other expert (mean log-probability per token) by at
    least SPECIFIC of the median lead: text of the writer's own domain, not of one another expert knows as well."""
    median = statistics.median(leads) if leads else 0.0
    if median <= 0:  # the writer is no better than the others on its own text: nothing to tell apart
        return list(range(len(leads)))
    return [i for i, lead in enumerate(leads) if lead >= median * SPECIFIC]


@torch.inference_mode()
def mean_log_probabilities(model, pieces: list[list[int]], batch: int = 16) -> list[float]:
    """The mean log-probability `model` gives each piece's tokens after the first."""
    device = model.get_input_embeddings().weight.device
    found = []
    for start in range(0, len(pieces), batch):
        group = pieces[start:start + batch]
        ids, mask = padded(group, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        taken = (logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)) * mask[:, 1:]
        found += (taken.sum(-1) / mask[:, 1:].sum(-1).clamp_min(1)).tolist()
    return found


def samples_per_prompt(prompts: int, budget: int = TOKENS_PER_EXPERT, new_tokens: int = NEW_TOKENS) -> int:
    return max(1, math.ceil(budget / (max(prompts, 1) * new_tokens)))


def expert_texts(experts: list[Expert], sources: list[ModelSource], base: ModelSource,
                 encode: Callable[[str], list[int]], encode_text: Callable[[str], list[int]], bos: list[int],
                 start: list[int], device: str = "cpu", seed: int | None = None, trust_remote_code: bool = False,
                 log: Callable[[str], None] = print, check: Callable[[], None] = lambda: None,
                 done: Callable[[int, int, str], None] = lambda step, steps, label: None
                 ) -> tuple[dict[tuple, list[int]], dict[tuple, Lesson]]:
    """Calibration text per expert, keyed by `text_key`: its own files, else text it writes (from its prompts, and
    from a document's start) that the other experts do not know as well (`kept_texts`, `read_alike`); and, under the
    same keys, what the expert predicts on each piece and how far the base is from it (studio/build/refine.py's
    lessons), taken while it is in memory.
    `done(step, steps, label)` hears of each step: an expert's text ready, then an expert's reading of the others'
    written texts."""
    writes = [not e.calibration_text for e in experts]
    judged = any(writes) and len(experts) > 1
    steps = len(experts) * (2 if judged else 1)
    doing = "writing" if any(writes) else "reading their"
    base_model = load_writer(base, device, trust_remote_code)
    still_loaded = []  # (source, model) of the last expert, which reads first: one load fewer than N for the reading

    def model_of(source: ModelSource):
        if still_loaded and still_loaded[0][0] is source:
            return still_loaded.pop()[1]
        return base_model if source is base else load_writer(source, device, trust_remote_code)

    pieces_of, taught_of, free_of, continuations_of = [], [], [], []
    for index, (expert, source) in enumerate(zip(experts, sources)):
        check()
        if expert.calibration_text:
            log(f"Expert {index} ({expert.source_model}): reading its calibration text from "
                f"{', '.join(expert.calibration_text)}")  # a Hub dataset's file may take a while to download
            pieces = read_calibration_text(expert, index, encode_text, bos)
            log(f"Expert {index} ({expert.source_model}): {sum(map(len, pieces))} tokens of its calibration text")
            model = model_of(source)
            free, continuations = [False] * len(pieces), 0
        else:
            prompts = [encode(p) for p in expert.positive_prompts or []]
            samples = samples_per_prompt(len(prompts))
            starts = FREE_TEXTS if judged and start else 0  # only the other experts' reading tells when they serve
            log(f"Expert {index} ({expert.source_model}) writes {samples} continuations of each of its "
                f"{len(prompts)} prompts and {starts} texts from a document's start, {NEW_TOKENS} tokens each")
            model = model_of(source)
            rows = [prompt for prompt in prompts for _ in range(samples)] + [start] * starts
            pieces, advantages, surprises = write_text(model, base_model, rows, 1, seed=(seed or 0) + index,
                                                       check=check)
            continuations = len(rows) - starts
            kept = typical_of_each(advantages, surprises, continuations)
            log(f"  kept {len(kept)} of {len(pieces)} texts: those whose advantage over the base is typical of "
                f"the expert (median {statistics.median(advantages):.2f} nats per token; of a text from a document's "
                f"start, typical of those too) and that do not surprise it (median "
                f"{statistics.median(surprises):.2f} nats per token)")
            pieces = [pieces[i] for i in kept]
            free = [i >= continuations for i in kept]
        pieces_of.append(pieces)
        free_of.append(free)
        continuations_of.append(continuations)
        taught_of.append(lessons(model, base_model, pieces, index))
        if judged and index == len(experts) - 1:
            still_loaded.append((source, model))
        del model
        done(index + 1, steps, f"Experts {doing} calibration text: {index + 1} of {len(experts)} done")
    if judged:
        log("Each expert reads the other experts' written texts: a text is kept where its writer leads them")
        written = {index: pieces_of[index] for index in range(len(experts)) if writes[index]}
        readings = _readings(sources, written, model_of, base_model, check,
                             lambda judges: done(len(experts) + judges, steps, f"Experts reading each other's text: "
                                                                               f"{judges} of {len(experts)} done"))
        for index, (kept, astray) in _chosen(readings, pieces_of, free_of, continuations_of).items():
            _log_kept(log, f"Expert {index} ({experts[index].source_model})", astray,
                      [free_of[index][i] for i in kept], readings[index][0])
            pieces_of[index] = [pieces_of[index][i] for i in kept]
            taught_of[index] = [taught_of[index][i] for i in kept]
    keyed = [(text_key(index, i), piece, lesson) for index, (pieces, taught) in enumerate(zip(pieces_of, taught_of))
             for i, (piece, lesson) in enumerate(zip(pieces, taught, strict=True))]
    return {key: piece for key, piece, _ in keyed}, {key: lesson for key, _, lesson in keyed}


def _readings(sources: list[ModelSource], written: dict[int, list[list[int]]], model_of, base,
              check: Callable[[], None], read: Callable[[int], None]) -> dict[int, tuple[list[float], list[float]]]:
    """Writer -> for each of its `written` texts, how far it leads the best other expert there and what it gains over
    `base` (mean log-probability per token); every expert reads every written text, one in memory at a time, the
    last first: it may still be in memory from writing."""
    scores: dict[int, dict[int, list[float]]] = {index: {} for index in written}  # writer -> reader -> per text
    for reading, reader in enumerate(reversed(range(len(sources)))):
        check()
        model = model_of(sources[reader])
        for writer, pieces in written.items():
            scores[writer][reader] = mean_log_probabilities(model, pieces)
        del model
        read(reading + 1)
    readings = {}
    for writer, by_reader in scores.items():
        table = torch.tensor([by_reader[reader] for reader in range(len(sources))])  # (readers, texts)
        leads = table[writer] - torch.cat([table[:writer], table[writer + 1:]]).max(dim=0).values
        gains = table[writer] - torch.tensor(mean_log_probabilities(base, written[writer]))
        readings[writer] = (leads.tolist(), gains.tolist())
    return readings


def _chosen(readings: dict[int, tuple[list[float], list[float]]], pieces_of: list[list[list[int]]],
            free_of: list[list[bool]], continuations_of: list[int]) -> dict[int, tuple[list[int], bool]]:
    """Writer -> the indices of its texts kept, and whether its prompts led it astray (`kept_texts`); where they did
    not, its own texts from a document's start join the continuations kept; of all these, only those that read like
    the texts kept stay (`read_alike`, against every expert's text: kept, or given)."""
    chosen = {index: kept_texts(*reading, free_of[index], continuations_of[index])
              for index, reading in readings.items()}
    references = {index: [pieces_of[index][i] for i in kept] for index, (kept, _) in chosen.items()}
    references.update({index: pieces for index, pieces in enumerate(pieces_of) if index not in readings})
    for index, (kept, astray) in chosen.items():
        own = [] if astray else [i for i in own_pieces(*readings[index]) if free_of[index][i]]
        candidates = kept + own
        chosen[index] = [candidates[i] for i in read_alike([pieces_of[index][i] for i in candidates], index,
                                                            references)], astray
    return chosen


def _log_kept(log: Callable[[str], None], expert: str, astray: bool, free: list[bool], leads: list[float]) -> None:
    if astray:
        log(f"{expert}: its prompts led it astray (fewer than {STRAY:.0%} of their continuations are its own: "
            f"another expert gains there about as much); kept the {len(free)} texts that are its own, {sum(free)} of "
            f"them written from a document's start")
    else:
        log(f"{expert}: kept {free.count(False)} continuations of its prompts: those it predicts ahead of every other "
            f"expert by at least {SPECIFIC:.0%} of its median lead ({statistics.median(leads) if leads else 0:.2f} "
            f"nats per token) and that read like its text, not another expert's; and {sum(free)} texts of its own "
            f"from a document's start that read like them")


def text_targets(texts: dict[tuple, list[int]], experts: int) -> dict[tuple, torch.Tensor]:
    """Every token of an expert's text wants that expert."""
    return {key: torch.nn.functional.one_hot(torch.tensor(key[1]), experts).float() for key in texts}
