"""Robustness analysis: common corruptions, adversarial attacks, randomized smoothing, attack self-checks.

Everything works on ``[0, 1]`` float image tensors ``(B, C, H, W)`` and a ``torch.nn.Module`` that
maps them to logits ``(B, K)`` (normalization inside the model). Models are evaluated in eval mode;
randomness comes only from explicit ``random_state`` / ``generator`` arguments.

Entry points
------------
* :func:`corrupt`, :data:`CORRUPTIONS`, :func:`corruption_benchmark` — :mod:`.corruptions`
* :func:`fgsm`, :func:`pgd`, :func:`deepfool`, :func:`carlini_wagner_l2`, :func:`square_attack`,
  :data:`ATTACKS`, :func:`run_attack`, :func:`robust_accuracy_curve`, :func:`curve_from_breaks` (the curve of
  attacks already run), :func:`breaking_budget` — :mod:`.attacks`
* :func:`certify`, :func:`certified_accuracy_curve`, :func:`radius_grid`, :func:`clopper_pearson_lower` —
  :mod:`.smoothing`
* :func:`attack_self_check`, :func:`gradient_masking_checks`, :func:`robustness_self_check` — :mod:`.selfcheck`

The workspace run (:mod:`.run`) calls these same functions for its curves, certification and self-checks. One
convention holds everywhere: a sample never broken on an ε grid has breaking budget **NaN** (0 for clean errors).
"""

from ._common import RobustnessInputError
from .attacks import (
    ATTACKS,
    AttackResult,
    AttackSpec,
    RobustAccuracyCurve,
    breaking_budget,
    carlini_wagner_l2,
    curve_from_breaks,
    deepfool,
    evaluate_adversarial,
    fgsm,
    pgd,
    robust_accuracy_curve,
    run_attack,
    square_attack,
)
from .corruptions import CORRUPTIONS, SEVERITIES, CorruptionBenchmark, corrupt, corruption_benchmark
from .selfcheck import (
    ActiveTestModel,
    GradientMaskingReport,
    RobustnessSelfCheckReport,
    SelfCheckResult,
    attack_self_check,
    build_active_test_model,
    gradient_masking_checks,
    robustness_self_check,
)
from .smoothing import (
    CertifyResult,
    abstention_rate,
    certified_accuracy_curve,
    certified_radius,
    certify,
    clopper_pearson_lower,
    radius_grid,
)

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "SEVERITIES",
    "ActiveTestModel",
    "AttackResult",
    "AttackSpec",
    "CertifyResult",
    "CorruptionBenchmark",
    "GradientMaskingReport",
    "RobustAccuracyCurve",
    "RobustnessInputError",
    "RobustnessSelfCheckReport",
    "SelfCheckResult",
    "abstention_rate",
    "attack_self_check",
    "breaking_budget",
    "build_active_test_model",
    "carlini_wagner_l2",
    "certified_accuracy_curve",
    "certified_radius",
    "certify",
    "clopper_pearson_lower",
    "corrupt",
    "corruption_benchmark",
    "curve_from_breaks",
    "deepfool",
    "evaluate_adversarial",
    "fgsm",
    "gradient_masking_checks",
    "pgd",
    "radius_grid",
    "robust_accuracy_curve",
    "robustness_self_check",
    "run_attack",
    "square_attack",
]
