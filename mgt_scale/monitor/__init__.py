# Collapse monitoring: residual-stream geometry metrics and MGT operator statistics (metrics), the
# probe that captures them from a model (probe), collapse alarms and their checkpointed state (alarms),
# metric sinks and the run-directory JSONL formats (loggers), and `mgt report` (report, imported on
# demand because it loads matplotlib).
from mgt_scale.monitor.alarms import AlarmDecision, CollapseMonitor, MonitorState, evaluate_alarms
from mgt_scale.monitor.loggers import (GEOMETRY_FILE, METRICS_FILE, JsonlLogger, MetricLogger, MultiLogger,
                                       TensorBoardLogger, WandbLogger, build_loggers, read_jsonl)
from mgt_scale.monitor.metrics import (geometry_summary, hidden_geometry, layer_geometry, make_geometry_record,
                                       mgt_op_stats, summarise_mgt_ops)
from mgt_scale.monitor.probe import capture_hidden_states, capture_probe, probe_geometry

__all__ = ["AlarmDecision", "CollapseMonitor", "MonitorState", "evaluate_alarms", "GEOMETRY_FILE", "METRICS_FILE",
           "JsonlLogger", "MetricLogger", "MultiLogger", "TensorBoardLogger", "WandbLogger", "build_loggers",
           "read_jsonl", "geometry_summary", "hidden_geometry", "layer_geometry", "make_geometry_record",
           "mgt_op_stats", "summarise_mgt_ops", "capture_hidden_states", "capture_probe", "probe_geometry"]
