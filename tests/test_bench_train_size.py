"""The training comparison's `epochs` size: the depth of training follows the chunk length of the searched point."""

from __future__ import annotations

from pathlib import Path

from benchmarks.train_compare import steps_for_epochs
from spanflow.data.features import featurize
from spanflow.models.modeling import load_tokenizer
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records


def test_epochs_count_the_steps_over_the_chunks_at_the_configured_length(tmp_path: Path) -> None:
    cfg = tiny_config(make_tiny_model_dir(tmp_path / "tiny-bert"))
    records = tiny_records(12)
    tokenizer = load_tokenizer(cfg.model)
    steps = {}
    for length in (48, 96):
        c = cfg.with_values({"features.chunk_length": length, "features.overlap": 16, "train.batch_size": 4})
        chunks = len(featurize(records, tokenizer, length, 16, c.features.max_query_length))
        steps[length] = steps_for_epochs(records, c, 2)
        assert steps[length] == 2 * -(-chunks // 4)
    assert steps[48] > steps[96]  # shorter chunks: more of them, more steps per epoch
