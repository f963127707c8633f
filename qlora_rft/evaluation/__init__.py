"""Evaluation on one device: inference into predictions.jsonl (`runner`), metrics from a predictions file alone
(`scoring`, by each task's metric function: pycocotools / LVIS mAP, accuracy, mIoU, mean reward; `rows`, the pieces
they share), and reports with plots (`report`)."""
