"""Channel importance criteria: a score per channel of every prunable group (higher = keep).

Registered criteria: ``l1`` (PFEC filter norm), ``l1_group`` (filters and the readers' input slices), ``l2``,
``bn_scale`` (network slimming), ``gradient`` (GDP), ``taylor`` (Molchanov et al.) and ``otp`` (sensitivity x
(1 - correlation)).
Build one with :func:`create_criterion`; see :class:`Criterion` for the contract they all keep.
"""

from __future__ import annotations

from . import bn_scale, gradient, magnitude, otp, taylor  # noqa: F401  (registers the criteria)
from ._common import Writer, out_members
from .base import CRITERIA, Criterion, DataCriterion, create_criterion, criterion_names, register_criterion
from .bn_scale import BNScaleCriterion
from .gradient import GradientCriterion
from .magnitude import GroupL1Criterion, L1Criterion, L2Criterion
from .otp import OTPCriterion, OTPFactors, max_abs_correlation
from .taylor import TaylorCriterion

__all__ = ["CRITERIA", "BNScaleCriterion", "Criterion", "DataCriterion", "GradientCriterion", "GroupL1Criterion",
           "L1Criterion", "L2Criterion", "OTPCriterion", "OTPFactors", "TaylorCriterion", "Writer", "create_criterion",
           "criterion_names", "max_abs_correlation", "out_members", "register_criterion"]
