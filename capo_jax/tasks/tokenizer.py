"""A small built-in byte-level BPE tokenizer for the embedded arithmetic task.

Why not characters: with a ~26-symbol vocabulary CAPO's top-K truncation (K = 50) keeps every token and no token is
rare, which hides what the curvature model does on a real LLM (docs/MATH.md §2.7). This tokenizer has ~1k tokens,
of which the task text uses a few dozen; the rest (English sub-words, number words, unused bytes) form the long tail
an LLM's softmax spreads mass over.

Design, following Qwen2's tokenizer so the model family sees a familiar layout:
- pre-tokenizer: Qwen2's split regex (letters with one leading non-letter, single digits, punctuation runs,
  whitespace), then byte-level mapping; decoder: byte-level. Every string, including unseen Unicode, round-trips
  exactly: decode(encode(x)) == x.
- digits are always single tokens (as in Qwen2), so numbers are spelled digit by digit.
- special tokens `<pad>` = 0, `<bos>` = 1, `<eos>` = 2. Encoding with add_special_tokens=True prepends `<bos>`; no
  `<eos>` is appended (append it to supervised targets; generation stops on it).
- trained deterministically (fixed corpus seed, no randomness in the trainer) on task texts plus generated generic
  text (number words, operator words, a few hundred English words with Zipf frequencies). Building twice gives a
  byte-identical tokenizer.json; it takes about a second.
"""

from __future__ import annotations

import os

import numpy as np

from capo_jax.tasks.arith import DIFFICULTIES, ArithTask

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "arith_tokenizer_corpus", "build_arith_tokenizer",
           "load_arith_tokenizer"]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
# Qwen2's pre-tokenizer pattern (single digits: `\p{N}` without `+`).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS_SEED = 20251002

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}

# A few hundred common English words (function words first, so Zipf weights make them the frequent ones).
_ENGLISH = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by not word
but what some we can out other were all there when up use your how said an each she which do their time if will way
about many then them write would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now find any new work part take
get place made live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add even land here
must big high such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow study still
learn plant cover food sun four between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run while press close night real life few north open seem together next white
children begin got walk example ease paper group always music those both mark often letter until mile river car feet
care second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
color face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct pose leave song measure door product black short numeral class wind question happen complete ship area
half rock order fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel less morning
ten simple several vowel toward war lay against pattern slow center love person money serve appear road map rain rule
govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final gave green quick develop
ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay
wheel full force blue object decide surface deep moon island foot system busy test record boat common gold possible
plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant
fill east paint language among grand ball yet wave drop heart present heavy dance engine position arm wide sail
material size vary settle speak weight general ice matter circle pair include divide syllable felt perhaps pick sudden
count square reason length represent art subject region energy hunt probable bed brother egg ride cell believe
fraction forest sit race window store summer train sleep prove lone exercise wall catch mount wish sky board joy
winter sat written wild instrument kept glass grass cow job edge sign visit past soft fun bright gas weather month
million bear finish happy hope flower clothe strange gone jump baby eight village meet root buy raise solve metal
whether push seven paragraph third shall held hair describe cook floor either result burn hill safe cat century
consider type law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight lie beat
excite natural view sense ear else quite broke case middle kill son lake moment scale loud spring observe child
straight consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet stone tiny
climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease hole trade melody
trip office receive row mouth exact symbol die least trouble shout except wrote seed tone join suggest clean break lady
yard rise bad blow oil blood touch grew cent mix team wire cost lost brown wear garden equal sent choose fell fit flow
fair bank collect save control decimal gentle woman captain practice separate difficult doctor please protect noon
whose locate ring character insect caught period indicate radio spoke atom human history effect electric expect crop
modern element hit student corner party supply bone rail imagine provide agree thus capital chair danger fruit rich
thick soldier process operate guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem
string bell depend meat rub tube famous dollar stream fear sight thin triangle planet hurry chief colony clock mine tie
enter major fresh search send yellow gun allow print dead spot desert suit current lift rose continue block chart hat
sell success company subtract event particular deal swim term opposite wife shoe shoulder spread arrange camp invent
cotton born determine quart nine truck noise level chance gather shop stretch throw shine property column molecule
select wrong gray repeat require broad prepare salt nose plural anger claim continent oxygen sugar death pretty skill
women season solution magnet silver thank branch match suffix especially fig afraid huge sister steel discuss forward
similar guide experience score apple bought led pitch coat mass card band rope slip win dream evening condition feed
tool total basic smell valley nor double seat arrive master track parent shore division sheet substance favor connect
post spend chord fat glad original share station dad bread charge proper bar offer segment slave duck instant market
degree populate chick dear enemy reply drink occur support speech nature range steam motion path liquid log meant
quotient teeth shell neck
""".split()


def _number_words(n: int) -> str:
  """English words for 0 ≤ n < 10⁶, e.g. 73 → 'seventy-three', 1980 → 'one thousand nine hundred eighty'."""
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
  if n < 1000:
    rest = "" if n % 100 == 0 else " " + _number_words(n % 100)
    return _ONES[n // 100] + " hundred" + rest
  rest = "" if n % 1000 == 0 else " " + _number_words(n % 1000)
  return _number_words(n // 1000) + " thousand" + rest


def arith_tokenizer_corpus(*, problems_per_difficulty: int = 400, num_sentences: int = 3000) -> list[str]:
  """The deterministic training corpus: task texts, the same problems in words, and Zipf-distributed English.

  The task part uses train problems of every difficulty (with a fixed seed), so the tokenizer never depends on the
  run's seed or sees held-out problems.
  """
  rng = np.random.default_rng(_CORPUS_SEED)
  corpus: list[str] = []
  for difficulty in sorted(DIFFICULTIES):
    task = ArithTask(seed=_CORPUS_SEED, difficulty=difficulty)
    for problem in task.train_problems(0, problems_per_difficulty):
      corpus.append(problem.text)
      # The same computation in words: number words and operator words join the vocabulary's tail.
      words = problem.expression.split()
      spoken = " ".join(_OP_WORDS.get(w) or _number_words(int(w)) for w in words)
      answer = _number_words(problem.answer) if problem.answer >= 0 else "minus " + _number_words(-problem.answer)
      corpus.append(f"{spoken.capitalize()} equals {answer}.")
  ranks = np.arange(1, len(_ENGLISH) + 1, dtype=np.float64)
  zipf = 1.0 / ranks
  zipf /= zipf.sum()
  for _ in range(num_sentences):
    length = int(rng.integers(4, 16))
    words = [_ENGLISH[k] for k in rng.choice(len(_ENGLISH), size=length, p=zipf)]
    corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
  return corpus


def _train_tokenizer_json(vocab_size: int) -> str:
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      special_tokens=_SPECIAL_TOKENS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # All 256 bytes: any text is encodable.
      show_progress=False,
  )
  tokenizer.train_from_iterator(arith_tokenizer_corpus(), trainer=trainer)
  bos_id = tokenizer.token_to_id(BOS_TOKEN)
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)])
  return tokenizer.to_str(pretty=True)


def _wrap(tokenizer_object):
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer_object,
      bos_token=BOS_TOKEN,
      eos_token=EOS_TOKEN,
      pad_token=PAD_TOKEN,
      padding_side="left",  # Prompts are left-padded for generation (see the model contract).
      clean_up_tokenization_spaces=False,  # Keeps decode(encode(x)) == x.
  )


def build_arith_tokenizer(path: str | os.PathLike | None = None, *, vocab_size: int = 1024):
  """Trains the built-in BPE tokenizer and returns it as a `transformers.PreTrainedTokenizerFast`.

  Args:
    path: optional directory; when given the tokenizer is saved there with `save_pretrained` (`tokenizer.json`,
      `tokenizer_config.json`) and can be reloaded with `load_arith_tokenizer(path)`.
    vocab_size: total vocabulary including the 256 byte tokens and 3 special tokens, in [512, 4096]. The corpus
      supports at least 1024.

  Returns:
    A PreTrainedTokenizerFast with pad/bos/eos set, left padding, `<bos>` prepended by default.
  """
  from tokenizers import Tokenizer

  if not isinstance(vocab_size, int) or not 512 <= vocab_size <= 4096:
    raise ValueError(f"vocab_size must be an int in [512, 4096], got {vocab_size!r}; the byte alphabet alone takes "
                     "256 ids and the generated corpus cannot fill more than a few thousand.")
  tokenizer = _wrap(Tokenizer.from_str(_train_tokenizer_json(vocab_size)))
  if path is not None:
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
  return tokenizer


def load_arith_tokenizer(path: str | os.PathLike):
  """Loads a tokenizer saved by `build_arith_tokenizer(path)` (reads `<path>/tokenizer.json`)."""
  from tokenizers import Tokenizer

  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no tokenizer.json in {os.fspath(path)!r}; build it with build_arith_tokenizer(path).")
  return _wrap(Tokenizer.from_file(file))
