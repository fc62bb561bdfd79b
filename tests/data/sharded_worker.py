"""One process of a 2-process `process_sharding='shard'` pipeline on loopback (gloo).

  python -m tests.data.sharded_worker PORT PROCESS_ID SOURCES OUT_JSON

Takes 5 batches, gathers the data state (a collective), takes 3 more; then a fresh iterator
restores the gathered state and takes 3 batches. Writes the state and both 3-batch runs.
"""

import itertools
import json
import sys

from absl import flags
import jax
import ml_collections

from yocou_jax.data import chat, pipeline, tokenizers


def main(port: str, process_id: str, sources: str, out_json: str):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  flags.FLAGS.mark_as_parsed()
  data_config = ml_collections.ConfigDict(dict(
      seq_len=32, tfds_name="unused", tfds_data_dir=None, text_glob=None, text_key="text",
      train_split="train", eval_split="validation", tokenizer="byte", num_workers=0,
      packing_bins=4, shuffle_window=16, sources=sources, eval_sources="",
      chat_template=chat.DEFAULT_TEMPLATE, shuffle_blocks=2, index_dir=None,
      process_sharding="shard"))

  def new_iterator():
    return pipeline.make_train_iterator(
        data_config, tokenizers.ByteTokenizer(), global_batch_size=4, seed=0,
        process_index=jax.process_index(), process_count=jax.process_count())

  def tokens(iterator):
    return [b["tokens"].tolist() for b in itertools.islice(iterator, 3)]

  iterator = new_iterator()
  list(itertools.islice(iterator, 5))
  state = iterator.get_state()
  expected = tokens(iterator)
  resumed = new_iterator()
  resumed.set_state(json.loads(json.dumps(state)))
  with open(out_json, "w") as f:
    json.dump({"state": state, "expected": expected, "resumed": tokens(resumed)}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
