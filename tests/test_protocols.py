"""The model protocols of pssm.core: each family offers what its guides and objectives read,
and a guide given a model without it names the missing attribute (no model is trained)."""

import numpy as np
import pytest

from inference.guides import auxiliary, ekvae_guide, filtering, kalman_smoothing
from inference.objectives import EKVAEBound
from pssm import core
from pssm.auxiliary import auxiliary_lgssm
from pssm.ekvae import ekvae
from pssm.lgssm import lgssm
from pssm.locally_linear import locally_linear
from pssm.protocols import missing
from pssm.rssm import rssm

A, Q, H, R = 0.9 * np.eye(2), 0.1 * np.eye(2), np.eye(2), 0.1 * np.eye(2)


def test_families_offer_their_protocols():
    exact = lgssm(A, Q, H, R)
    assert isinstance(exact, core.LinearGaussian) and isinstance(exact, core.ExactLikelihood)
    assert not isinstance(exact, core.AuxiliaryVariables)
    linear = auxiliary_lgssm(A, Q, H, R, C=np.eye(3, 2))
    mlp = auxiliary_lgssm(A, Q, H, R, decoder="mlp", obs_dim=3)
    for model in (linear, mlp):
        assert isinstance(model, core.AuxiliaryVariables) and isinstance(model, core.AuxiliarySizes)
    assert isinstance(linear, core.ExactLikelihood) and not isinstance(mlp, core.ExactLikelihood)
    ll = locally_linear(3, 2)
    assert isinstance(ll, core.LinearGaussian) and isinstance(ll, core.Dimensions)
    assert not isinstance(ll, core.ExactLikelihood) and not isinstance(ll, core.Preprocessed)
    net = rssm(3, 1, stoch=2, deter=4, hidden=8)
    assert isinstance(net, core.DeterministicPath) and isinstance(net, core.Dimensions)
    assert isinstance(net, core.Preprocessed) and not isinstance(net, core.LinearGaussian)
    for vhp_dim in (None, 2):  # vhp = None still follows FlatAuxiliary
        ek = ekvae(4, 2, 2, vhp_dim=vhp_dim, transition_hidden=(4,), decoder_hidden=(4,))
        assert isinstance(ek, core.FlatAuxiliary) and isinstance(ek, core.AuxiliaryBound)


def test_a_missing_protocol_is_named():
    def bare(obs, actions=None, mask=None):
        pass

    assert missing(bare, core.FlatAuxiliary) == [
        "auxiliary_dim", "obs_dim", "structure", "auxiliary_site", "vhp", "flatten",
    ]  # fmt: skip
    with pytest.raises(TypeError, match="kalman_smoothing needs a model carrying `structure` "):
        kalman_smoothing(bare)
    with pytest.raises(TypeError, match="carrying `auxiliary_site` .*AuxiliaryVariables"):
        auxiliary(lgssm(A, Q, H, R))
    with pytest.raises(TypeError, match="carrying `auxiliary_dim`, `obs_dim` .*AuxiliarySizes"):
        bare.structure, bare.auxiliary_site = (lambda *a, **k: None), "a"
        auxiliary(bare)
    with pytest.raises(TypeError, match="ekvae_guide needs a model carrying .*FlatAuxiliary"):
        ekvae_guide(bare)
    with pytest.raises(TypeError, match="EKVAEBound needs a model carrying `bound` .*AuxiliaryB"):
        EKVAEBound().rate_distortion(None, {}, bare, None)
    with pytest.raises(TypeError, match="`obs_dims`, `action_dim`, `latent_dim` .*Dimensions"):
        filtering(lgssm(A, Q, H, R), latent_dim=2).belief_posterior()
