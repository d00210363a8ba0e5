"""Multi-query associative recall (MQAR) with distractors, at long context.

One sequence of ``length`` tokens:

    BOS  [ ... noise ... k1 v1 ... noise ... k2 v2 ... noise ... ]  SEP  kq1 vq1 kq2 vq2 ...
         '------------------- haystack ----------------------------'      '--- queries ---'

- ``num_pairs`` key-value pairs (distinct keys, random values) sit at uniformly random,
  non-overlapping places anywhere in the haystack; the rest of the haystack is filler
  drawn from a separate noise vocabulary.
- After SEP come ``num_queries`` of those keys (a random subset, in random order), each
  followed by its value. The model is supervised only on the value after each query key
  (labels are -100 elsewhere), and accuracy is the exact match of those answer tokens.
- Distractors: the filler, the other pairs (the model must find *its* key, not any key),
  and with num_pairs > num_queries pairs that are never asked for.

Why a short window cannot solve it: a query's pair lies anywhere in the haystack, so a
sliding window of W tokens at the end sees only about W / length of the pairs (~12% at
W = 512, length 4096), while MSA must *select* the one block holding the pair.

Keys, values and noise use disjoint token ranges; the assignment of values to keys is
fresh in every sequence, so nothing can be memorised: the answer must be retrieved.

The filler (``haystack``):

- ``"noise"``: i.i.d. uniform noise tokens. Nothing in it can be predicted, so only the
  answers are supervised, and a layer's attention at every other position is unconstrained
  by the loss.
- ``"chain"``: an in-context Markov chain over the noise tokens. Each sequence draws its own
  successor permutation ``succ`` (one random cycle through all noise tokens); the next
  filler token is ``succ(current)`` with probability ``chain_prob``, else uniform (a jump).
  Nothing is memorisable (``succ`` is new in every sequence), but after a token's first
  occurrence its successor can be read off the context: attend to the token after an
  earlier occurrence of the current one (an induction lookup, the same lookup that answers a
  query). ``lm_labels`` supervises every filler-to-filler transition, so that, as in language
  modelling, attention is used at (almost) every position and not only at the answers.
  With ``chain_occurrences`` > 0 a sequence's chain walks over a random subset of about
  haystack_len / chain_occurrences noise tokens, so that a token recurs about that often at
  any length (over all noise tokens the recurrences grow with the length, and the lookup's
  attention spreads over ever more, equally useful, occurrences).
Generation is deterministic given the ``torch.Generator`` (and device) it is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IGNORE = -100  # label of unsupervised positions (torch cross_entropy's ignore_index)
PAD, BOS, SEP = 0, 1, 2
NUM_SPECIAL = 3
HAYSTACKS = ("noise", "chain")


@dataclass(frozen=True)
class TaskConfig:
    num_keys: int = 128      # key vocabulary (keys of a sequence are drawn without replacement)
    num_values: int = 64     # value vocabulary
    num_noise: int = 64      # filler vocabulary
    num_pairs: int = 16      # pairs hidden in the haystack
    num_queries: int = 16    # pairs asked for at the end (the rest are distractor pairs)
    haystack: str = "noise"  # filler: "noise" (i.i.d.) or "chain" (in-context Markov chain)
    chain_prob: float = 0.8  # "chain": probability that the next filler token is succ(current)
    # "chain": if > 0, each sequence's chain runs over a random subset of about
    # haystack_len / chain_occurrences noise tokens (so a state recurs about this many times
    # at any length); 0: over all num_noise tokens
    chain_occurrences: float = 0.0

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if not 0.0 <= self.chain_prob <= 1.0:
            raise ValueError(f"chain_prob must be in [0, 1], got {self.chain_prob}")
        if self.chain_occurrences < 0:
            raise ValueError(f"chain_occurrences must be >= 0, got {self.chain_occurrences}")
        if self.num_pairs > self.num_keys:
            raise ValueError("num_pairs must be <= num_keys (keys of a sequence are distinct)")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError("num_queries must be in [1, num_pairs]")

    @property
    def key_start(self) -> int:
        return NUM_SPECIAL

    @property
    def value_start(self) -> int:
        return self.key_start + self.num_keys

    @property
    def noise_start(self) -> int:
        return self.value_start + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.noise_start + self.num_noise

    def haystack_len(self, length: int) -> int:
        return length - 2 - 2 * self.num_queries  # minus BOS, SEP and the query section

    def min_length(self) -> int:
        # the pairs need 2 tokens each, and there should be room for some filler
        return 2 + 2 * self.num_queries + 3 * self.num_pairs

    def chain_states(self, length: int) -> int:
        """How many noise tokens a "chain" haystack of a ``length``-token sequence walks over."""
        if self.chain_occurrences <= 0:
            return self.num_noise
        n = round(self.haystack_len(length) / self.chain_occurrences)
        return max(2, min(self.num_noise, n))

    def to_dict(self) -> dict:
        return asdict(self)


def make_batch(cfg: TaskConfig, batch: int, length: int, generator: torch.Generator,
               device=None) -> dict:
    """A batch of MQAR sequences, all of ``length`` tokens.

    Returns a dict of tensors on ``device`` (default: the generator's device):
      tokens  int64 [batch, length]   the input
      labels  int64 [batch, length]   next-token targets: the value at each query key, else -100
      answer_pos int64 [batch, Q]     positions whose prediction is an answer (the query keys)
      pair_pos   int64 [batch, Q]     position of the queried key in the haystack (for depth
                                      analyses and the indexer's retrieval hit rate)
      lm_labels  int64 [batch, length] ("chain" haystack only) next-token targets of every
                                      filler position followed by filler, else -100
    """
    if length < cfg.min_length():
        raise ValueError(f"length {length} is too short for {cfg.num_pairs} pairs and "
                         f"{cfg.num_queries} queries (min {cfg.min_length()})")
    gdev = generator.device
    device = gdev if device is None else torch.device(device)
    n, q, hay = cfg.num_pairs, cfg.num_queries, cfg.haystack_len(length)
    kw = dict(generator=generator, device=gdev)

    # Non-overlapping 2-token slots: n sorted distinct starts s_i in [0, hay - n) spread
    # to a_i = s_i + i, so that a_{i+1} - a_i >= 2 and the last value lands at <= hay - 1.
    # Uniform over all placements (stars and bars).
    s = torch.rand(batch, hay - n, **kw).argsort(dim=1)[:, :n].sort(dim=1).values
    key_pos = s + torch.arange(n, device=gdev) + 1  # +1: after BOS

    keys = torch.rand(batch, cfg.num_keys, **kw).argsort(dim=1)[:, :n] + cfg.key_start
    values = torch.randint(0, cfg.num_values, (batch, n), **kw) + cfg.value_start

    if cfg.haystack == "chain":
        states = cfg.chain_states(length)
        tokens = markov_chain(batch, length, states, cfg.chain_prob, generator)
        if states < cfg.num_noise:  # this sequence's states: a random subset of the noise tokens
            subset = torch.rand(batch, cfg.num_noise, **kw).argsort(dim=1)[:, :states]
            tokens = subset.gather(1, tokens)
        tokens = tokens + cfg.noise_start
    else:
        tokens = torch.randint(0, cfg.num_noise, (batch, length), **kw) + cfg.noise_start
    tokens[:, 0] = BOS
    tokens.scatter_(1, key_pos, keys)
    tokens.scatter_(1, key_pos + 1, values)
    sep = 1 + hay
    tokens[:, sep] = SEP

    # Queries: a random subset of the pairs in random order (pairs sit in position order,
    # so a random permutation of the pair ids decouples query order from depth).
    pick = torch.rand(batch, n, **kw).argsort(dim=1)[:, :q]
    qk, qv = keys.gather(1, pick), values.gather(1, pick)
    answer_pos = sep + 1 + 2 * torch.arange(q, device=gdev).expand(batch, q)
    tokens.scatter_(1, answer_pos, qk)
    tokens.scatter_(1, answer_pos + 1, qv)

    labels = torch.full_like(tokens, IGNORE)
    labels.scatter_(1, answer_pos, qv)  # position t predicts token t + 1
    out = dict(tokens=tokens, labels=labels, answer_pos=answer_pos, pair_pos=key_pos.gather(1, pick))
    if cfg.haystack == "chain":
        # filler -> filler transitions of the haystack (not the ones into or out of a pair,
        # whose tokens overwrote the chain, and not SEP): t predicts t + 1
        noise = tokens >= cfg.noise_start
        lm = torch.full_like(tokens, IGNORE)
        both = noise[:, :-1] & noise[:, 1:]
        lm[:, :-1] = torch.where(both, tokens[:, 1:], lm[:, :-1])
        out["lm_labels"] = lm
    return {k: v.to(device) for k, v in out.items()}


def markov_chain(batch: int, length: int, num_states: int, stay: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` int64 states in [0, num_states): per sequence a random cyclic
    permutation ``succ``; x_0 uniform, then x_{t+1} = succ(x_t) with probability ``stay``,
    else uniform (a jump)."""
    gdev = generator.device
    kw = dict(generator=generator, device=gdev)
    # succ: one random cycle through all states (a random cyclic order), so that the chain
    # never loops through a short cycle that a local window could read off
    order = torch.rand(batch, num_states, **kw).argsort(dim=1)
    succ = torch.empty_like(order).scatter_(1, order, order.roll(-1, dims=1))
    jump = torch.rand(batch, length, **kw) >= stay
    start = torch.randint(0, num_states, (batch, length), **kw)  # the state after a jump
    return chain_walk(succ, jump, start)


def chain_walk(succ: torch.Tensor, jump: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """x_t = start_t where ``jump[:, t]`` (and at t = 0), else succ(x_{t-1}); per sequence.

    Vectorised (no loop over the length): between two jumps the chain walks ``succ``, so
    x_t = succ^(t - s)(start_s) with s the last jump at or before t; the power is applied by
    binary decomposition with the permutations succ^(2^b) (log2(length) gathers)."""
    batch, length = jump.shape
    jump = jump.clone()
    jump[:, 0] = True
    t = torch.arange(length, device=jump.device).expand(batch, length)
    last = torch.where(jump, t, torch.zeros_like(t)).cummax(dim=1).values
    x = start.gather(1, last)
    steps = t - last
    power = succ  # succ^(2^b)
    for b in range(max(1, (length - 1).bit_length())):  # no host sync on the max
        x = torch.where((steps >> b) & 1 == 1, power.gather(1, x), x)
        power = power.gather(1, power)
    return x


def eval_set(cfg: TaskConfig, length: int, num_seqs: int, seed: int) -> dict:
    """The fixed evaluation set of one context length, on the CPU: drawn in one go from
    ``seed`` and ``length``, so every variant, on any device and at any eval batch size,
    sees the same sequences."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return make_batch(cfg, num_seqs, length, g)


def split_batches(data: dict, batch: int, device):
    """Yield consecutive slices of ``batch`` sequences of a make_batch dict, on ``device``."""
    n = data["tokens"].shape[0]
    for i in range(0, n, batch):
        yield {k: v[i:i + batch].to(device) for k, v in data.items()}
