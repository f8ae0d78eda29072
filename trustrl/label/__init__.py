"""``trustrl label``: a local web app where people rank K responses to a prompt, and the
judges that rank them instead (RLAIF).

* :mod:`trustrl.label.store`: the judgement log (append-only JSONL, fsync per action) and
  who sees which item next;
* :mod:`trustrl.label.candidates`: the K responses per prompt, from a file or sampled from a
  model in the background, ahead of the annotator;
* :mod:`trustrl.label.app`: the Starlette app (JSON API + one self-contained page);
* :mod:`trustrl.label.judges`: ranking by a reward model, a reward function or a generative
  judge;
* :mod:`trustrl.label.cli`: ``trustrl label ...`` and ``trustrl label stats``.

The rows it writes are those of :mod:`trustrl.rankings`; ``trustrl train rm dataset=LOG``
trains a reward model on them.
"""
