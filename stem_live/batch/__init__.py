"""``stem-live batch``: many recordings replayed through the engine on a Dask cluster.

- :mod:`.inputs`: files, folders (recursive) and globs to a sorted list of readable files,
  each with a unique output name;
- :mod:`.average`: the drift-corrected (per-line de-warped) and the rigidly aligned average
  of a series, from its frames and its replay results (numpy + scipy);
- :mod:`.refine`: the hindsight drift of a whole series the averages use (not causal);
- :mod:`.outputs`: atomic writes, the ImageJ TIFF with its pixel size, the HyperSpy signal
  (rosettasciio), the one-page figure;
- :mod:`.summary`: one row per input (``summary.csv``);
- :mod:`.job`: one input, start to end, in one worker process;
- :mod:`.runner`: the Dask part (``dask.distributed``, optional extra ``stem-live[batch]``,
  imported there only), progress, restarts.
"""

from stem_live.batch.inputs import BatchInput, expand_inputs

__all__ = ["BatchInput", "expand_inputs"]
