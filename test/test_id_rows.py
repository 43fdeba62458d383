"""Id-to-row lookups that the feature field, the instances and the prior labels share."""
import numpy as np

from instascene_ros.core.id_rows import present_rows_of, rows_of


def test_rows_follow_ids_through_an_unsorted_table_and_mark_the_absent():
    table = np.array([40, 7, 93, 12])  # ids as densification and pruning leave them: unsorted
    query = np.array([[12, 5], [40, 93]])
    assert rows_of(table, query).tolist() == [[3, -1], [0, 2]]
    assert rows_of(table, np.array([101])).tolist() == [-1]  # past the largest id
    assert rows_of(np.zeros(0, np.int64), query).tolist() == [[-1, -1], [-1, -1]]


def test_present_rows_keep_query_order_and_drop_ids_the_table_lost():
    table = np.array([40, 7, 93, 12])
    assert present_rows_of(table, [93, 3, 7, 40]).tolist() == [2, 1, 0]
    assert present_rows_of(table, []).tolist() == []
