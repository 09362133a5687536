"""FLOPs per token of the paper's full-size variants against the closed form (slow: meta forwards at seq 4096)."""
import pytest

import zoo


def expected_flops_per_token(cfg, seq_len):
    """2 FLOPs per multiply-add: every matmul weight a token passes through, plus QK^T and AV at full seq_len."""
    d, L, dh = cfg.d_model, cfg.n_layers, cfg.head_size
    attn_proj = d * (cfg.n_heads + 2 * cfg.kv_heads) * dh + cfg.n_heads * dh * d
    if cfg.is_moe:
        m = cfg.moe
        ffn = m.top_k * 3 * d * m.hidden_size + m.num_experts * d + m.shared_experts * 3 * d * m.hidden_size
    else:
        ffn = 3 * d * cfg.ffn.hidden_size
    head = d * cfg.vocab_size
    attention = 2 * cfg.n_heads * dh * seq_len  # QK^T and AV, multiply-adds per token
    return 2 * (L * (attn_proj + ffn + attention) + head)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.list_models("olmo*"))
def test_paper_variant_flops_match_closed_form(name):
    cfg = zoo.get_config(name)
    st = zoo.stats(name)
    assert st.seq_len == cfg.max_seq_len == 4096
    assert st.flops_per_token == expected_flops_per_token(cfg, st.seq_len)
    assert st.train_flops_per_token == 3 * st.flops_per_token


@pytest.mark.slow
def test_paper_variant_sizes():
    dense, moe = zoo.stats("olmo2-1b-hybridnorm", flops=False), zoo.stats("olmoe-1b-7b-hybridnorm-star", flops=False)
    assert dense.total_params == dense.active_params == pytest.approx(1.18e9, rel=0.01)
    assert moe.total_params == pytest.approx(6.92e9, rel=0.01)
    assert moe.active_params == pytest.approx(1.28e9, rel=0.01)
