"""The full reference protocol on the real model: slow (~20-40 min on 2 CPU cores), not in CI.

Run with: python -m pytest -m slow tests/test_perplexity_full.py
"""

import pytest

from evaluation.perplexity import perplexity


@pytest.mark.slow
@pytest.mark.model
def test_dense_smollm2_wikitext2_full_protocol(smollm2):
    # 21.61 was measured with an independent implementation (GGUF dequantized, fp32, 148 windows).
    result = perplexity(smollm2.model, smollm2.tokenizer, "wikitext2", seqlen=2048)
    assert result.windows == 148
    assert round(result.perplexity, 2) == 21.61, result
