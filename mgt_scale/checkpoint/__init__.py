# Sharded, verified, resumable checkpoints: `manager.py` (CheckpointManager: save, find_resume, load,
# rollback re-saves, retention), `manifest.py` (the on-disk format: manifest, sha256 records, latest_good,
# verification), `collective.py` (rank 0 chooses, every rank hashes its own share), `writer.py` (the
# background writer of `checkpoint.async_save`), `universal.py` (DeepSpeed universal checkpoints for a new
# world size), `retention.py` (keep_last / keep_every, damaged ones set aside), `listing.py` (`mgt ckpt
# list`'s status of each checkpoint).
