"""The training report's file form (training/job.py)."""

from mergekit_dam.training.job import TrainingReport


def test_the_report_leaves_out_what_a_mode_does_not_measure():
    report = TrainingReport(mode="layerwise", steps=3, device="cpu", processes=1, dtype="float32", seconds=1.0,
                            tokens_per_second=10.0, peak_memory_bytes=1, trainable_coefficients=4,
                            held_out_kl={"final": {"a": 0.1}}, loss_curve=[], resolved={"lr": 0.01})
    data = report.to_dict()
    assert data["resolved"] == {"lr": 0.01} and data["stages"] == 1
    assert not {"training_kl", "validation", "lr_probe", "packing", "estimate"} & set(data)
