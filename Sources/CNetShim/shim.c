#include "CNetShim.h"
