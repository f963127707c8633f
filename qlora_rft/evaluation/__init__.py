"""Evaluation on one device: inference into predictions.jsonl (`runner`), metrics from a predictions file alone
(`scoring`: pycocotools / LVIS mAP, accuracy, mIoU), and reports with plots (`report`)."""
