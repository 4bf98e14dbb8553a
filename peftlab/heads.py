"""A classifier = a backbone's body + pooling + a linear head.

Or, for causal LMs, label-word scoring (a verbalizer): no new head at all, each label is scored
by the log-probability the model's own LM head gives its word(s) after the input, so a frozen LM
can classify ("Sentiment:" -> " positive" vs " negative"), as prompt tuning and in-context
learning want.

Pooling reads one vector per sequence from the body's last hidden states:
  last   the last real (non-pad) token: right for causal LMs, whose last token has seen all
         others; correct under left or right padding
  first  the first real token ([CLS] for BERT-family encoders)
  mean   the mean over real tokens
"""

import torch
from torch import nn

from peftlab.arch import Arch
from peftlab.errors import PeftlabError
from peftlab.pooled import hidden_at, pool_position
from peftlab.runconfig import Pooling
from peftlab.speed import in_fp32
from peftlab.unpad import last_hidden
from peftlab.virtual import body_inputs


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) 0/1 mask -> (B, H)."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_position(mask, how)]


class LabelWords(nn.Module):
    """Scores labels by the summed log-probability of their words under the LM head.

    No parameters of its own. Words get a leading space (they follow a prompt such as
    "Sentiment:"); multi-token words are scored token by token, each row-label pair as one
    sequence. Needs left padding, so that every input ends at the last position.
    """

    def __init__(self, arch: Arch, tokenizer, words: tuple[str, ...]):
        super().__init__()
        if arch.lm_head is None or not arch.causal:
            raise PeftlabError(f"label-word scoring needs a causal LM with an LM head; '{arch.model_type}' has "
                               "none here: use --head linear")
        ids = [tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"] for w in words]
        if any(not x for x in ids) or len(set(map(tuple, ids))) < len(ids):
            raise PeftlabError(f"label words {list(words)} must be non-empty and tokenize differently; "
                               "give others with --label-words")
        width = max(map(len, ids))
        self.words = tuple(words)
        self.register_buffer("word_ids", torch.tensor([x + [0] * (width - len(x)) for x in ids]), persistent=False)
        self.register_buffer("word_mask", torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                             persistent=False)

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) log-probabilities of each label's words after each input. The LM head
        runs in fp32 even under bf16 autocast, as task heads do (`in_fp32`): label words' log-
        probabilities are often close, and it reads only the scored positions."""
        if not bool(attention_mask[:, -1].all()):
            raise PeftlabError("label-word scoring needs left-padded inputs")
        B, (L, W) = input_ids.shape[0], self.word_ids.shape
        lm_head = model.arch.lm_head
        if W == 1:  # one forward: the next-token distribution after the input
            kw, mask, pool_mask = body_inputs(model, input_ids, attention_mask, share_start=1)
            last = torch.full(mask.shape[:1], pool_mask.shape[1] - 1, device=mask.device)  # of the body's input
            h = hidden_at(model, kw, mask, last)
            return self._log_probs(lm_head, h)[:, self.word_ids[:, 0]]
        words, wmask = self.word_ids.repeat(B, 1), self.word_mask.repeat(B, 1)  # (B*L, W)
        ids = torch.cat([input_ids.repeat_interleave(L, 0), words], 1)
        mask = torch.cat([attention_mask.repeat_interleave(L, 0), wmask.to(attention_mask.dtype)], 1)
        kw, _, _ = body_inputs(model, ids, mask, share_start=W + 1)
        h = model.body(**kw).last_hidden_state[:, -W - 1:-1]  # the positions that predict each word token
        logp = self._log_probs(lm_head, h).gather(-1, words.unsqueeze(-1)).squeeze(-1)
        return (logp * wmask).sum(-1).view(B, L)

    @staticmethod
    def _log_probs(lm_head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        with in_fp32(h):
            return lm_head(h.float()).log_softmax(-1)


class Classifier(nn.Module):
    """Backbone body + pooling + linear head (or label-word scoring); forward returns (B, num_labels) logits."""

    def __init__(self, arch: Arch, num_labels: int, pooling: Pooling = "auto", tokenizer=None,
                 label_words: tuple[str, ...] | None = None, bidirectional: bool = False):
        super().__init__()
        self.arch = arch  # plain attribute: handles on the body's parts for the methods
        self.tokenizer = tokenizer  # for methods that start from text (prompt-tuning init)
        self.body = arch.body
        self.prompt: nn.Module | None = None  # virtual input embeddings (prompt tuning)
        self.prefix: nn.Module | None = None  # virtual keys/values (prefix tuning)
        if getattr(self.body, "pooler", None) is not None:
            self.body.pooler = None  # BERT's pooler is unused: we pool last_hidden_state ourselves
        self.causal = arch.causal
        self.bidirectional = check_bidirectional(arch, bidirectional, label_words)
        self.pooling = auto_pooling(arch, pooling, self.bidirectional)
        if label_words is not None:
            if len(label_words) != num_labels:
                raise PeftlabError(f"{len(label_words)} label words for {num_labels} labels; give one per label")
            self.head: nn.Module = LabelWords(arch, tokenizer, tuple(label_words))
            return
        self.head = nn.Linear(arch.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=arch.hidden_size**-0.5)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (B, H) features of the body."""
        kw, mask, pool_mask = body_inputs(self, input_ids, attention_mask)
        if self.pooling == "mean":
            return pool(last_hidden(self, kw, mask), pool_mask, "mean")
        return hidden_at(self, kw, mask, pool_position(pool_mask, self.pooling))

    @property
    def reads_features(self) -> bool:
        """True when the head sees only the pooled features (so they may come from a cache)."""
        return not isinstance(self.head, LabelWords)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        with in_fp32(features):
            return self.head(features.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, LabelWords):
            return self.head(self, input_ids, attention_mask)
        return self.classify(self.features(input_ids, attention_mask))


def auto_pooling(arch: Arch, pooling: str, bidirectional: bool = False) -> str:
    """'auto': the last token of a causal LM (it alone has seen every other), the first ([CLS])
    of an encoder or of a causal LM run bidirectionally."""
    if pooling != "auto":
        return pooling
    return "last" if arch.causal and not bidirectional else "first"


def check_bidirectional(arch: Arch, bidirectional: bool, label_words) -> bool:
    if bidirectional and not arch.causal:
        raise PeftlabError(f"--bidirectional applies to causal LMs; '{arch.model_type}' already attends both ways")
    if bidirectional and label_words is not None:
        raise PeftlabError("--bidirectional cannot score label words (the next-token head needs the causal "
                           "mask); use --head linear")
    return bidirectional


class SeparatorToken(nn.Module):
    """A token added to the vocabulary between input and target, with a trainable embedding.

    The embedding matrix stays as it is (frozen, not resized): hooks on the embeddings look the
    new id up as id 0 and then swap in `vector` at its positions, so the one new row trains
    without unfreezing the others. The LM head never predicts it: it only ever sits in prompts.
    """

    def __init__(self, arch: Arch, tokenizer, token: str):
        super().__init__()
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        self.id = tokenizer.convert_tokens_to_ids(token)
        emb = arch.embeddings
        self.vector = nn.Parameter(emb.weight.detach().mean(0).clone())  # the mean: a neutral start
        self._hit: torch.Tensor | None = None
        emb.register_forward_pre_hook(self._lookup)
        emb.register_forward_hook(self._swap)

    def _lookup(self, module: nn.Module, args: tuple):
        self._hit = args[0] == self.id
        return (args[0].masked_fill(self._hit, 0), *args[1:])

    def _swap(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hit, self._hit = self._hit.unsqueeze(-1), None
        return torch.where(hit, self.vector.to(output.dtype), output)


class LanguageModel(nn.Module):
    """Backbone body + its own LM head, for generation. Methods attach as on a Classifier.

    `head` holds what is new for the task (a separator token's embedding, or nothing), so the
    shared code that trains and saves "method + head" needs no special case.
    """

    def __init__(self, arch: Arch, tokenizer, sep_token: str | None = None):
        super().__init__()
        if arch.lm_head is None or not arch.causal:
            raise PeftlabError(f"generation needs a causal LM with an LM head; '{arch.model_type}' has none: "
                               "use a causal LM, e.g. tiny-gpt2 or smollm2-135m")
        self.arch, self.tokenizer, self.body = arch, tokenizer, arch.body
        self.prompt: nn.Module | None = None
        self.prefix: nn.Module | None = None
        self.causal = True
        self.head: nn.Module = SeparatorToken(arch, tokenizer, sep_token) if sep_token else nn.ModuleList()

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last hidden states of the real tokens (virtual ones dropped)."""
        kw, mask, _ = body_inputs(self, input_ids, attention_mask)
        return last_hidden(self, kw, mask)[:, -input_ids.shape[1]:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits at every real position."""
        return self.arch.lm_head(self.hidden(input_ids, attention_mask))
