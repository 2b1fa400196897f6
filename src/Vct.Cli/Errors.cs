using System.Reflection;
using System.Runtime.InteropServices;
using System.Text.Json;

namespace Vct.Cli;

/// <summary>
/// Turns any exception into the one line <c>vct</c> prints before exiting 1: wrappers (aggregate, reflection, type
/// initialisation) are unwrapped to their cause, LibTorch's multi-line native messages are cut to their first line, and
/// errors whose message says nothing of their kind (JSON, arithmetic, format, memory) get it in front. The stack trace
/// is printed only with <c>VCT_DEBUG=1</c>.
/// </summary>
internal static class Errors
{
    public static bool Debug => Environment.GetEnvironmentVariable("VCT_DEBUG") == "1";

    /// <summary>The exception that caused <paramref name="e"/>: aggregates, invocation and type-initialiser wrappers removed.</summary>
    public static Exception Cause(Exception e, out int others)
    {
        others = 0;
        while (true)
        {
            switch (e)
            {
                case AggregateException a:
                    var inner = a.Flatten().InnerExceptions;
                    if (inner.Count == 0) return e;
                    // The first failure that is not a consequence of another's cancellation.
                    var first = inner.FirstOrDefault(x => x is not OperationCanceledException) ?? inner[0];
                    others += inner.Count - 1;
                    e = first;
                    break;
                case TargetInvocationException { InnerException: { } ti }:
                    e = ti;
                    break;
                case TypeInitializationException { InnerException: { } tie }:
                    e = tie;
                    break;
                default:
                    return e;
            }
        }
    }

    static string FirstLine(string? text)
    {
        var s = (text ?? "").Trim();
        var nl = s.IndexOfAny(['\r', '\n']);
        return nl < 0 ? s : s[..nl].TrimEnd();
    }

    static string OneLine(string? text) =>
        string.Join(" ", (text ?? "").Split(['\r', '\n'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));

    /// <summary>One line describing <paramref name="e"/> (without the "vct: " prefix).</summary>
    public static string Describe(Exception e)
    {
        var cause = Cause(e, out var others);
        // LibTorch's messages carry a C++ trace after their first line; others are joined into one line.
        var msg = cause is ExternalException ? FirstLine(cause.Message) : OneLine(cause.Message);
        var line = cause switch
        {
            OutOfMemoryException or InsufficientMemoryException => $"out of memory: {msg}",
            JsonException => $"invalid JSON: {msg}",
            DivideByZeroException or OverflowException or NotFiniteNumberException or ArithmeticException => $"arithmetic error: {msg}",
            FormatException => $"malformed value: {msg}",
            OperationCanceledException => "cancelled",
            // LibTorch's errors (invalid shapes, devices or sizes): the first line of its message, the C++ trace dropped.
            ExternalException => $"LibTorch: {msg}",
            ArgumentException or InvalidOperationException or IOException or InvalidDataException or NotSupportedException
                or UnauthorizedAccessException or KeyNotFoundException => msg,
            _ => $"{cause.GetType().Name}: {msg}",
        };
        if (others > 0) line += $" (and {others} more error(s))";
        return line;
    }

    /// <summary>Prints the line (and with VCT_DEBUG=1 the whole exception) to stderr; returns the exit code 1.</summary>
    public static int Report(Exception e)
    {
        try
        {
            Console.Error.WriteLine($"vct: {Describe(e)}");
            if (Debug) Console.Error.WriteLine(e);
        }
        catch (IOException)
        {
            // stderr closed: the exit code still tells.
        }
        return 1;
    }
}
