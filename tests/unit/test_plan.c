/* test_plan: the micro-batch rule m = ceil(2 (1 + T_c / T_f)) clamped to [lo, hi]. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "afd_plan.h"

static void test_rule(void **state)
{
    (void)state;
    /* no communication: the ping-pong needs two */
    assert_int_equal(afd_plan_micro_batches(0, 100, 2, 4), 2);
    /* T_c = T_f / 2: 2 * 1.5 = 3 */
    assert_int_equal(afd_plan_micro_batches(50, 100, 2, 4), 3);
    /* just over: 2 * 1.51 = 3.02 -> 4 */
    assert_int_equal(afd_plan_micro_batches(51, 100, 2, 4), 4);
    /* communication dominates: clamped */
    assert_int_equal(afd_plan_micro_batches(1000, 100, 2, 4), 4);
    /* the paper's setting (3 micro-batches) holds for T_c up to T_f / 2 */
    assert_int_equal(afd_plan_micro_batches(30, 100, 2, 4), 3);
}

static void test_degenerate(void **state)
{
    (void)state;
    assert_int_equal(afd_plan_micro_batches(10, 0, 2, 4), 2);
    assert_int_equal(afd_plan_micro_batches(-1, 100, 2, 4), 2);
    assert_int_equal(afd_plan_micro_batches(0, 100, 1, 8), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_rule),
                                       cmocka_unit_test(test_degenerate)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
