#include "CXenTestSupport.h"
