"""The lab's C4 calibration sampler gives the token windows of the reference's ``get_c4``
(transcribed in reference_loop.py) on the offline C4 shard with SmolLM2's real tokenizer."""

import pytest
import torch
from reference_loop import c4_texts, get_c4

from prune.recipe import CalibrationSpec
from runtime.calibration import calibration_ids

pytestmark = pytest.mark.model


@pytest.mark.parametrize(("nsamples", "seqlen", "seed"), [(8, 256, 0), (4, 1024, 3)])
def test_c4_sampler_equals_the_reference_get_c4(smollm2, data_dir, nsamples, seqlen, seed):
    spec = CalibrationSpec(source="c4", nsamples=nsamples, seqlen=seqlen, seed=seed)
    ours = calibration_ids(spec, smollm2.tokenizer)
    theirs = get_c4(c4_texts(data_dir), nsamples, seed, seqlen, smollm2.tokenizer)
    assert theirs.shape == (nsamples, seqlen)
    assert torch.equal(ours, theirs)
