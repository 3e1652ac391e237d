/* A tiny program embedding the distribution's shared libpython (e.g. libpython3.11.so.1.0):
 * the interpreter state lives in the shared library, not in the executable. Runs a script
 * like `python3 script.py args…`.
 *
 *   cc -O1 -o embed-python embed.c $(python3.11-config --includes) -lpython3.11
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

int main(int argc, char **argv) {
    return Py_BytesMain(argc, argv);
}
