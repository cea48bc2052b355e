"""A checkpoint written by the training loop exports to a Hugging Face directory that transformers
loads with the trained weights: its logits equal the trained engine model's."""
import torch

from run_utils import make_trainer, run_trainer, tiny_data, tiny_run_config  # noqa: F401 (fixture)
from engine.convert.sharded import export_hf


def test_trained_checkpoint_exports_to_transformers(tiny_data, tmp_path):  # noqa: F811
    transformers = __import__("transformers")
    cfg = tiny_run_config(tiny_data, tmp_path / "run", train={"iters": 3})
    trainer = make_trainer(cfg)
    run_trainer(trainer)
    hf_dir = export_hf(tmp_path / "run", tmp_path / "hf", progress=False)

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, tiny_data["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        engine_logits = trainer.chunks[0](ids)[..., :trainer.config.vocab_size]
        hf_logits = hf(ids).logits
    # The export holds the trained weights, not the initial ones.
    init = make_trainer(tiny_run_config(tiny_data, None)).chunks[0]
    with torch.no_grad():
        assert (init(ids)[..., :trainer.config.vocab_size] - engine_logits).abs().max() > 1e-3
    torch.testing.assert_close(hf_logits, engine_logits, rtol=1e-5, atol=1e-5)
