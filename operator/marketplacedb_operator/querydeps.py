"""What a view query calls, from PostgreSQL's own parse tree (libpg_query), never from text.

Two uses, both erring on the safe side:
- validation: a call to a built-in *volatile* function (`setval`, `lo_from_bytea`,
  `pg_terminate_backend`, `random`, ...) is refused before anything reaches the database, unless the
  view opts in with `allowVolatileFunctions` (such a query writes or acts at every refresh);
- skip-if-unchanged: time functions (`now()`, `current_date`, ...) make a view change with no write.

The catalog check at refresh time (sql/refresh_sql.py) sees what the parser cannot: user-defined
functions, their volatility and the tables they read. This module is pure (no I/O).
"""

from __future__ import annotations

from typing import Any, Final

import pg_query

# Built-in functions with provolatile = 'v' in PostgreSQL 15 (pg_catalog, every overload volatile),
# from `SELECT DISTINCT proname FROM pg_proc WHERE provolatile = 'v' AND pronamespace =
# 'pg_catalog'::regnamespace`. Trigger, handler and binary-upgrade functions cannot be called from
# a SELECT and are left out. The catalog check covers anything this list misses.
VOLATILE_BUILTINS: Final = frozenset("""
bernoulli brin_desummarize_range brin_summarize_new_values brin_summarize_range clock_timestamp current_query
currtid2 currval cursor_to_xml cursor_to_xmlschema gen_random_uuid gin_clean_pending_list lastval lo_close lo_creat
lo_create lo_export lo_from_bytea lo_get lo_import lo_lseek lo_lseek64 lo_open lo_put lo_tell lo_tell64 lo_truncate
lo_truncate64 lo_unlink loread lowrite nextval pg_advisory_lock pg_advisory_lock_shared pg_advisory_unlock
pg_advisory_unlock_all pg_advisory_unlock_shared pg_advisory_xact_lock pg_advisory_xact_lock_shared pg_backup_start
pg_backup_stop pg_blocking_pids pg_cancel_backend pg_collation_actual_version pg_control_checkpoint pg_control_init
pg_control_recovery pg_control_system pg_copy_logical_replication_slot pg_copy_physical_replication_slot
pg_create_logical_replication_slot pg_create_physical_replication_slot pg_create_restore_point pg_current_logfile
pg_current_wal_flush_lsn pg_current_wal_insert_lsn pg_current_wal_lsn pg_database_collation_actual_version
pg_database_size pg_drop_replication_slot pg_export_snapshot pg_extension_config_dump pg_get_backend_memory_contexts
pg_get_multixact_members pg_get_shmem_allocations pg_get_wal_replay_pause_state pg_get_wal_resource_managers
pg_hba_file_rules pg_ident_file_mappings pg_import_system_collations pg_indexes_size pg_is_in_recovery
pg_is_wal_replay_paused pg_jit_available pg_last_committed_xact pg_last_wal_receive_lsn pg_last_wal_replay_lsn
pg_last_xact_replay_timestamp pg_lock_status pg_log_backend_memory_contexts pg_logical_emit_message
pg_logical_slot_get_binary_changes pg_logical_slot_get_changes pg_logical_slot_peek_binary_changes
pg_logical_slot_peek_changes pg_ls_archive_statusdir pg_ls_dir pg_ls_logdir pg_ls_logicalmapdir pg_ls_logicalsnapdir
pg_ls_replslotdir pg_ls_tmpdir pg_ls_waldir pg_nextoid pg_notification_queue_usage pg_notify pg_partition_ancestors
pg_partition_tree pg_prepared_xact pg_promote pg_read_binary_file pg_read_file pg_read_file_old pg_relation_size
pg_reload_conf pg_replication_origin_advance pg_replication_origin_create pg_replication_origin_drop
pg_replication_origin_progress pg_replication_origin_session_is_setup pg_replication_origin_session_progress
pg_replication_origin_session_reset pg_replication_origin_session_setup pg_replication_origin_xact_reset
pg_replication_origin_xact_setup pg_replication_slot_advance pg_rotate_logfile pg_rotate_logfile_old
pg_safe_snapshot_blocking_pids pg_sequence_last_value pg_show_all_file_settings pg_show_replication_origin_status
pg_sleep pg_sleep_for pg_sleep_until pg_stat_clear_snapshot pg_stat_file pg_stat_force_next_flush
pg_stat_get_recovery_prefetch pg_stat_have_stats pg_stat_reset pg_stat_reset_replication_slot pg_stat_reset_shared
pg_stat_reset_single_function_counters pg_stat_reset_single_table_counters pg_stat_reset_slru
pg_stat_reset_subscription_stats pg_stop_making_pinned_objects pg_switch_wal pg_table_size pg_tablespace_size
pg_terminate_backend pg_total_relation_size pg_try_advisory_lock pg_try_advisory_lock_shared
pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared pg_wal_replay_pause pg_wal_replay_resume
pg_xact_commit_timestamp pg_xact_commit_timestamp_origin pg_xact_status query_to_xml query_to_xml_and_xmlschema
query_to_xmlschema random set_config setseed setval system timeofday ts_stat txid_status
""".split())

# Functions whose result moves with the clock (the first five are also in the catalog check).
TIME_FUNCTIONS: Final = frozenset(
    {"now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday", "age"}
)
_SVF = pg_query.pg_query_pb2.SQLValueFunctionOp
# CURRENT_DATE ... LOCALTIMESTAMP(n): the SQL-standard spellings of "now", not function calls.
_TIME_SVF: Final = {
    _SVF.Value(name): name.removeprefix("SVFOP_").lower()
    for name in ("SVFOP_CURRENT_DATE", "SVFOP_CURRENT_TIME", "SVFOP_CURRENT_TIME_N", "SVFOP_CURRENT_TIMESTAMP",
                 "SVFOP_CURRENT_TIMESTAMP_N", "SVFOP_LOCALTIME", "SVFOP_LOCALTIME_N", "SVFOP_LOCALTIMESTAMP",
                 "SVFOP_LOCALTIMESTAMP_N")
}


def _walk(query: str) -> list[Any]:
    try:
        tree = pg_query.parse(query)
    except pg_query.PgQueryError:
        return []  # not parseable: the query validator reports that, not this module
    return [node for _, node in pg_query.walk(tree)]


def _name(node: Any) -> tuple[str | None, str]:
    parts = [part.string.sval for part in node.funcname]
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


def function_calls(query: str) -> list[str]:
    """Every function the query calls by name (schema-qualified as written), in order, deduplicated."""
    calls = []
    for node in _walk(query):
        if type(node).__name__ == "FuncCall":
            schema, name = _name(node)
            calls.append(f"{schema}.{name}" if schema else name)
    return list(dict.fromkeys(calls))


def volatile_calls(query: str) -> list[str]:
    """Calls of built-in volatile functions (unqualified or pg_catalog.), as written."""
    found = []
    for call in function_calls(query):
        schema, _, name = call.rpartition(".")
        if schema in ("", "pg_catalog") and name in VOLATILE_BUILTINS:
            found.append(call)
    return found


def time_calls(query: str) -> list[str]:
    """What makes the query's result move with the clock: time functions and CURRENT_DATE-style values."""
    found = []
    for node in _walk(query):
        kind = type(node).__name__
        if kind == "FuncCall":
            schema, name = _name(node)
            if schema in (None, "pg_catalog") and name in TIME_FUNCTIONS:
                found.append(f"{name}()")
        elif kind == "SQLValueFunction" and node.op in _TIME_SVF:
            found.append(_TIME_SVF[node.op])
    return list(dict.fromkeys(found))
