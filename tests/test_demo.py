"""The README's demo, small: the data path end to end, with the reward mask lined up on samples."""
import json

from engine.data.indexed import IndexedDataset
from engine.data.tokenizer import Tokenizer
from engine.data.batches import SampleMasks
from engine.demo import DemoConfig, run_data_demo
from engine.data.samples import GPTSampleDataset


def test_demo_runs_end_to_end(tmp_path):
    lines = []
    cfg = DemoConfig(workdir=str(tmp_path), records_per_domain=120, vocab_size=400, workers=2,
                     seq_length=64, progress=False)
    result = run_data_demo(cfg, log=lines.append)
    assert result["records"] == {"train": 480, "valid": 60}
    assert result["batch_shape"] == [4, 64]
    assert json.loads((tmp_path / "demo_summary.json").read_text())["samples"] == result["samples"]

    # Every masked token of a sample decodes to a reward label, and each record has exactly one.
    data = tmp_path / "data"
    tok = Tokenizer(str(data / "tokenizer.model"))
    tokens = IndexedDataset(str(data / "sar_train"))
    samples = GPTSampleDataset(tokens, 64, seed=0, num_epochs=1, cache_dir=str(data / "index_cache"))
    assert samples.loaded_from_cache
    masks = SampleMasks(samples, IndexedDataset(str(data / "sar_train_reward_mask")))
    for k in range(len(samples)):
        picked = samples[k][masks[k].astype(bool)]
        assert all(tok.id_to_piece(int(t)).startswith("<|r") for t in picked)
    mask_all = IndexedDataset(str(data / "sar_train_reward_mask"))
    assert all(int(mask_all[i].sum()) == 1 for i in range(len(mask_all)))
