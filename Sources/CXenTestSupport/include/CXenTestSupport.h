/* Test-only C: ring.h's own macros acting on shared memory, and layout probes. */
#ifndef CXEN_TEST_SUPPORT_H
#define CXEN_TEST_SUPPORT_H
#include <CXen.h>
#endif
