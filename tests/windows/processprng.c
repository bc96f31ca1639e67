/* Test-only stand-in for bcryptprimitives.dll, which Wine 8 lacks: Rust's standard library
 * imports ProcessPrng from it. Built by .ci/run with the mingw compiler and put beside the
 * agent's .exe for the wine tests (tests/it/windows.rs); never shipped (.ci/windows-zip takes
 * only the .exe). Windows 10 and Server 2016+ have the real DLL. */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
