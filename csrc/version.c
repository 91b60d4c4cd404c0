/* version.c: the ABI version the Python layer checks at import.  Calls: nothing. */
#include "fsdp.h"

int fsdp_abi_version(void)
{
    return FSDP_ABI_VERSION;
}
