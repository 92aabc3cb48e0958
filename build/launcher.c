/*
 * The bundle's executable (dist/aws-vpc-cni/aws-vpc-cni), in place of PyInstaller's bootloader.
 *
 * Every pod ADD and DEL execs three to four of our programs, so what an exec costs before our code
 * runs is paid 3-4 times per pod operation. PyInstaller's onedir bootloader on Linux starts, reads
 * its archive, sets LD_LIBRARY_PATH and execs itself again (unconditionally: glibc reads that
 * variable only at start-up), then loads libpython, runs its bootstrap modules (which import
 * ctypes on every start) and its run-time hooks. This launcher does only what our programs need:
 * one process, the bundled libpython linked in, the interpreter configured as PyInstaller
 * configures it, and build/entry.py run. Bundled shared libraries are found without
 * LD_LIBRARY_PATH: this executable carries DT_RPATH $ORIGIN/_internal, and build.sh points the
 * RUNPATH of every bundled library and extension module into the bundle (build/elfpaths.py).
 * Measured (aws-eni-ipam VERSION, CPU per exec): ~29 -> ~19 ms; see the commit messages of build/.
 *
 * What our code sees is what PyInstaller gave it: the same sys.path (the bundle's folder and its
 * lib-dynload; nothing from the environment), sys.executable (this file, symlinks resolved),
 * sys.prefix (_internal), sys.frozen and sys._MEIPASS, isolated mode without site, no bytecode
 * writing, Python's signal handlers, UTF-8 mode under the C/POSIX locale, LC_CTYPE from the
 * environment. It differs in that child processes get no LD_LIBRARY_PATH (nor _PYI_* variables),
 * so an iptables-save run by a plugin loads the host's libraries, not the bundle's.
 *
 * Built by build/build.sh with -DLIB_DYNLOAD="python3.X/lib-dynload" -DOPTIMIZE=<level>.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef LIB_DYNLOAD
#error "build with -DLIB_DYNLOAD=\"python3.X/lib-dynload\" (the bundle's extension module folder)"
#endif
#ifndef OPTIMIZE
#define OPTIMIZE 0
#endif

/* Run in __main__ once the interpreter is up: build/entry.py (_internal/entry.pyc), which first
 * gives Python 3.11's frozen stdlib modules their __file__ as PyInstaller's bootstrap does. */
#define RUN "import entry\nentry.main()\n"

static int fail(const char *what)
{
    fprintf(stderr, "aws-vpc-cni bundle: %s\n", what);
    return 127;
}

static int add_path(PyConfig *config, const char *dir, const char *sub)
{
    char path[PATH_MAX];
    wchar_t *wide;
    PyStatus status;

    if (snprintf(path, sizeof path, "%s%s%s", dir, *sub ? "/" : "", sub) >= (int)sizeof path)
        return -1;
    wide = Py_DecodeLocale(path, NULL);
    if (wide == NULL)
        return -1;
    status = PyWideStringList_Append(&config->module_search_paths, wide);
    PyMem_RawFree(wide);
    return PyStatus_Exception(status) ? -1 : 0;
}

int main(int argc, char **argv)
{
    char exe[PATH_MAX], home[PATH_MAX];
    ssize_t len;
    char *slash;
    PyPreConfig preconfig;
    PyConfig config;
    PyStatus status;
    PyObject *meipass;

    /* The bundle's folder, from the executable itself: argv[0] is a link in /opt/cni/bin. */
    len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return fail("cannot read /proc/self/exe");
    exe[len] = 0;
    slash = strrchr(exe, '/');
    if (slash == NULL || snprintf(home, sizeof home, "%.*s/_internal", (int)(slash - exe), exe) >= (int)sizeof home)
        return fail("the executable's path is too long");

    /* As PyInstaller 6's bootloader: isolated, LC_CTYPE from the environment, UTF-8 mode if that is
     * the C or POSIX locale. */
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = -1;
    preconfig.configure_locale = 1;
    status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        Py_ExitStatusException(status);

    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.configure_c_stdio = 1;
    config.buffered_stdio = 1;
    config.install_signal_handlers = 1;
    config.optimization_level = OPTIMIZE;
    config.parse_argv = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.executable, exe);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.home, home);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesArgv(&config, argc, argv);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetString(&config, &config.run_command, L"" RUN);
    if (PyStatus_Exception(status))
        goto config_error;
    config.module_search_paths_set = 1;
    if (add_path(&config, home, LIB_DYNLOAD) < 0 || add_path(&config, home, "") < 0) {
        PyConfig_Clear(&config);
        return fail("cannot set the module search path");
    }

    status = Py_InitializeFromConfig(&config);
    if (PyStatus_Exception(status))
        goto config_error;
    PyConfig_Clear(&config);

    /* What PyInstaller's bootstrap sets, for any code that asks. */
    meipass = PyUnicode_DecodeFSDefault(home);
    if (meipass == NULL || PySys_SetObject("_MEIPASS", meipass) < 0 || PySys_SetObject("frozen", Py_True) < 0) {
        PyErr_Print();
        return fail("cannot set sys._MEIPASS and sys.frozen");
    }
    Py_DECREF(meipass);
    return Py_RunMain();

config_error:
    PyConfig_Clear(&config);
    Py_ExitStatusException(status);
}
